"""Wan (2.1 T2V, 2.2 T2V-A14B, 2.2 TI2V-5B) as a ModelBackend, from a local diffusers-layout directory.

Computes what diffusers' WanPipeline.__call__ computes (diffusers 0.42), step by step, so the frames
are the same bit for bit (tests/unit/test_wan_backend.py):
- experts loaded with from_pretrained(..., dtype=bfloat16), which keeps the model's
  _keep_in_fp32_modules (time embedder, norms, scale-shift tables) in fp32; casting a loaded
  model or autocast instead changes the output;
- the noise: randn_tensor on (1, C, (frames-1)//4 + 1, H/8, W/8) (H/16 for TI2V-5B) in fp32 from a
  CPU generator seeded with the request's seed;
- a fresh scheduler per request (from the directory's config): UniPC is multistep and keeps
  history, so a shared scheduler would silently advance between requests;
- the scheduler's own timesteps (integers for UniPC) go to the DiT; the expert is `transformer`
  while t >= boundary_ratio * num_train_timesteps, then `transformer_2`; guidance_scale for the
  high-noise expert, guidance_scale_2 (defaulting to the former) for the low-noise one; CFG runs
  only when guidance_scale > 1, as in the pipeline;
- CFG: the conditional and unconditional branches go through the DiT as one batch of 2B
  (WanPipeline runs them one after the other; on CPU the batched forward gives the same bits in
  bf16, and in fp32 differs by about 1 ulp per forward: `cfg_batch=False` runs them as the
  pipeline does), mixed as uncond + g * (cond - uncond) in the DiT's output dtype;
- the VAE in fp32; latents de-normalised with latents_mean / latents_std; decoded one latent frame
  at a time through the causal decoder with a cache of its own per request (what
  AutoencoderKLWan._decode does in its loop, but yielding each frame group as it is ready:
  1 frame, then 4 per latent frame).

LoRAs per request (`DenoiseJob.adapter`, `adapter_strength`): services/denoiser/wan_lora.py — brand styles
and few-step distillation LoRAs (lightx2v's 4-step Wan2.2 LoRAs, run with guidance_scale 1: no CFG
branch), one file for every expert or one per expert, loaded as WanPipeline.load_lora_weights loads
them and kept as unmerged PEFT layers, so a request gives the pipeline's frames with that LoRA and
the base weights are never written (tests/unit/test_wan_lora.py). Applied where the experts are
loaded: the Ray driver (experts on shards) refuses adapters (FAILED_PRECONDITION, ADAPTER_UNSUPPORTED).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.denoiser.backends.base import (
    DenoiseJob,
    ExpertInfo,
    FrameRule,
    ModelBackend,
    ModelSupport,
    SamplerState,
    SizeRule,
    check_guidance,
)
from services.denoiser.wan_lora import WanLora, WanLoras
from videomesh.errors import FailedPrecondition, InvalidArgument
from videomesh.model_dir import ModelDirError, WanModelDir

log = logging.getLogger("videomesh.denoiser.wan")
ADAPTER_CACHE = 4  # LoRAs kept loaded per expert (a Wan2.2 A14B rank-64 LoRA is ~0.6 GB per expert)
TEXT_LENGTH = 512  # WanPipeline's max_sequence_length: the states are zero-padded to exactly this
MAX_STEPS = 200


@dataclass(frozen=True)
class _Preset:
    """What the directory does not say: published sizes, fps and sampling defaults per layout."""

    name: str
    official: tuple[tuple[int, int], ...]  # (width, height)
    fps: float
    frames: int
    steps: int
    guidance: tuple[float, float]  # (high noise, low noise); one-expert models use the first


_SIZES_720P_480P = ((1280, 720), (720, 1280), (832, 480), (480, 832))
_PRESETS = {
    # Wan2.2-T2V-A14B: 720p and 480p both ways, 81 frames at 16 fps, 40 steps, guidance 4.0 / 3.0
    "a14b": _Preset("wan2.2-t2v-a14b", _SIZES_720P_480P, 16.0, 81, 40, (4.0, 3.0)),
    # Wan2.1-T2V (one expert): the same sizes and rate, 50 steps, guidance 5.0
    "t2v": _Preset("wan2.1-t2v", _SIZES_720P_480P, 16.0, 81, 50, (5.0, 5.0)),
    # Wan2.2-TI2V-5B: 1280x704 both ways, 121 frames at 24 fps, 50 steps, guidance 5.0
    "ti2v5b": _Preset("wan2.2-ti2v-5b", ((1280, 704), (704, 1280)), 24.0, 121, 50, (5.0, 5.0)),
}


@dataclass
class _State(SamplerState):
    scheduler: object = None  # this request's own scheduler
    timesteps: torch.Tensor = None
    text: torch.Tensor = None  # (1, 512, D) in the DiT's dtype
    negative: torch.Tensor | None = None  # None when guidance_scale <= 1 (no CFG, as the pipeline)
    guidance: tuple[float, float] = (0.0, 0.0)  # (high noise, low noise)
    lora: WanLora | None = None  # the request's adapter, pinned at start (not a file replaced later)

    @property
    def t(self) -> torch.Tensor:
        return self.timesteps[self.step]


def _nn_modules():
    try:
        import diffusers
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
        from diffusers.utils.torch_utils import randn_tensor
    except ImportError:
        raise ImportError("the Wan backend needs diffusers: pip install -e '.[wan]'") from None
    return diffusers, WanCausalConv3d, unpatchify, randn_tensor


def _config(cls, model_dir: WanModelDir, sub: str) -> dict:
    """A component's config without loading its weights, with the class's defaults for what an older
    config.json leaves out (as from_pretrained fills them)."""
    params = inspect.signature(cls.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **cls.load_config(model_dir.path, subfolder=sub)}


class WanBackend(ModelBackend):
    """Not thread-safe per request; forwards of different requests must not run at the same time
    on one expert unless the caller serialises them (the executors do)."""

    kind = "wan2.2"  # ModelInfo.backend

    def __init__(
        self,
        model_dir: WanModelDir,
        experts: dict,
        vae,
        scheduler,
        *,
        device: torch.device,
        cfg_batch: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        adapters_dir: Path | None = None,
        adapter_cache: int = ADAPTER_CACHE,
    ):
        """experts: the loaded ones (a Ray driver loads none, a shard one); vae: None where this
        process never decodes (a shard). Their configs are read from the directory either way.
        adapters_dir: the LoRAs requests may name (services/denoiser/wan_lora.py; None = none)."""
        diffusers, conv_cls, self._unpatchify, self._randn = _nn_modules()
        self.dir = model_dir
        self.cfg_batch = cfg_batch
        self.experts = experts  # expert name -> WanTransformer3DModel
        self.vae = vae
        self.scheduler = scheduler  # the directory's scheduler: a template, never stepped
        self.device = device
        self.two_experts = model_dir.two_experts
        self.layout = "a14b" if self.two_experts else ("ti2v5b" if model_dir.expand_timesteps else "t2v")
        self.preset = _PRESETS[self.layout]
        self.name = self.preset.name
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.boundary_timestep = (
            model_dir.boundary_ratio * self.num_train_timesteps
            if model_dir.boundary_ratio is not None
            else None
        )
        first = next(iter(experts.values()), None)
        # the DiT's compute dtype (its fp32-kept modules aside), read as the pipeline reads it
        self.dtype = first.dtype if first is not None else dtype
        dit = (
            dict(first.config)
            if first is not None
            else _config(diffusers.WanTransformer3DModel, model_dir, "transformer")
        )
        self.channels = int(dit["in_channels"])
        self.patch = tuple(dit["patch_size"])
        self.text_dim = int(dit["text_dim"])
        self.rope_max = int(dit["rope_max_seq_len"])
        vae_cfg = (
            dict(vae.config) if vae is not None else _config(diffusers.AutoencoderKLWan, model_dir, "vae")
        )
        self.t_stride = int(vae_cfg["scale_factor_temporal"])
        self.s_stride = int(vae_cfg["scale_factor_spatial"])
        self._decoder_convs = (
            sum(isinstance(m, conv_cls) for m in vae.decoder.modules()) if vae is not None else 0
        )
        # the same on every replica and shard, whichever experts this process loaded
        dit = ("transformer", "transformer_2") if self.two_experts else ("transformer",)
        self.version = model_dir.identity(*dit, "vae", "scheduler")
        has_text = all((model_dir.path / c).is_dir() for c in ("tokenizer", "text_encoder"))
        self.encoder = f"umt5@{model_dir.identity('tokenizer', 'text_encoder')}" if has_text else ""
        names = ("high_noise", "low_noise") if self.two_experts else ("transformer",)
        self.loras = WanLoras(adapters_dir, names, experts, adapter_cache)

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        experts: Sequence[str] | None = None,
        cfg_batch: bool = True,
        vae: bool = True,
        adapters_dir: str | Path | None = None,
        adapter_cache: int = ADAPTER_CACHE,
    ) -> WanBackend:
        """Load a Wan directory's experts (all when None, or the named ones: a Ray shard loads one, the
        Ray driver none), VAE (fp32; vae=False skips it where nothing decodes) and scheduler. Raises
        ModelDirError naming the file and what was expected.

        cfg_batch: the CFG branches as one batch of 2n (the default), or as two forwards of n, as
        WanPipeline runs them. On CPU the batch gives the pipeline's bits in bf16, but fp32 GEMMs
        choose other kernels for a batch of 2 than of 1 (about 1 ulp per forward, up to 3.0e-6 on the
        frames of the tiny TI2V-5B model); two forwards give the pipeline's bits in fp32 too."""
        diffusers, *_ = _nn_modules()
        d = WanModelDir.open(path)
        names = ("high_noise", "low_noise") if d.two_experts else ("transformer",)
        wanted = names if experts is None else tuple(experts)
        for e in wanted:
            if e not in names:
                raise ValueError(f"expert {e!r}: this directory has {', '.join(names)}")
        parts = [cls._component(e) for e in wanted]
        d.require(*parts, *(("vae",) if vae else ()), "scheduler")
        device = torch.device(device)

        def load_part(sub: str, loader, **kw):
            try:
                return loader(d.path, subfolder=sub, **kw)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise ModelDirError(f"{d.path / sub}: could not load {d.class_name(sub)}: {e}") from e

        loaded = {
            e: load_part(cls._component(e), diffusers.WanTransformer3DModel.from_pretrained, dtype=dtype)
            .eval()
            .to(device)
            for e in wanted
        }
        decoder = (
            load_part("vae", diffusers.AutoencoderKLWan.from_pretrained, dtype=torch.float32)
            .eval()
            .to(device)
            if vae
            else None
        )
        sched_cls = getattr(diffusers, d.class_name("scheduler"), None)
        if sched_cls is None or not hasattr(sched_cls, "from_config"):
            raise ModelDirError(
                f"{d.path / 'model_index.json'}: scheduler class {d.class_name('scheduler')!r} is not a diffusers "
                "scheduler (expected e.g. UniPCMultistepScheduler)"
            )
        scheduler = load_part("scheduler", sched_cls.from_pretrained)
        backend = cls(d, loaded, decoder, scheduler, device=device, cfg_batch=cfg_batch, dtype=dtype,
                      adapters_dir=Path(adapters_dir) if adapters_dir is not None else None,
                      adapter_cache=adapter_cache)  # fmt: skip
        log.info(
            "wan backend %s from %s: experts %s in %s on %s, VAE %s, scheduler %s",
            backend.name, d.path, ", ".join(loaded) or "none", backend.dtype, device,
            "fp32" if vae else "not loaded", type(scheduler).__name__,
        )  # fmt: skip
        return backend

    @staticmethod
    def _component(expert: str) -> str:
        return "transformer_2" if expert == "low_noise" else "transformer"

    # --- what it supports ---------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return self.s_stride * max(self.patch[1], self.patch[2])

    def supports(self) -> ModelSupport:
        p = self.preset
        m = self.size_multiple
        g_high, g_low = p.guidance
        if self.two_experts:
            b = self.dir.boundary_ratio
            experts = (
                ExpertInfo("high_noise", b, g_high, "transformer"),
                ExpertInfo("low_noise", b, g_low, "transformer_2"),
            )
        else:
            experts = (ExpertInfo("transformer", 0.0, g_high, "transformer"),)
        return ModelSupport(
            name=p.name,
            version=self.version,
            sizes=SizeRule(
                official=p.official,
                multiple=m,
                min_side=m,
                max_side=m * self.rope_max,  # the DiT's rotary table covers rope_max_seq_len patches a side
                why=f"VAE stride {self.s_stride} x patch {self.patch[1]}",
            ),
            frames=FrameRule(
                counts=(p.frames,),
                step=self.t_stride,
                min_frames=1,
                max_frames=self.t_stride * (self.rope_max - 1) + 1,
                why="VAE",
            ),
            fps=p.fps,
            languages=("en", "zh", "ja"),  # UMT5 is multilingual; Wan is trained on Chinese and English
            experts=experts,
            text_dim=self.text_dim,
            text_length=TEXT_LENGTH,
            encoder=self.encoder,
            default_steps=p.steps,
            max_steps=MAX_STEPS,
            default_size=p.official[0],
            default_frames=p.frames,
        )

    def check_request(self, job: DenoiseJob, encoder_model: str = "") -> None:
        s = self.supports()
        for name, t, m in (
            ("text_embeddings", job.text, job.text_mask),
            ("negative_embeddings", job.negative, job.negative_mask),
        ):
            want = [1, TEXT_LENGTH, self.text_dim]
            if t.ndim != 3 or list(t.shape) != want or not t.is_floating_point():
                raise InvalidArgument(
                    f"{name}: expected float shape {want} (UMT5 states zero-padded to {TEXT_LENGTH} tokens, "
                    f"as WanPipeline pads them); got {list(t.shape)} {t.dtype}",
                    field=name,
                )
            mname = name.replace("embeddings", "mask")
            if m.ndim != 2 or list(m.shape) != want[:2] or m.dtype != torch.bool:
                raise InvalidArgument(f"{mname}: expected bool shape {want[:2]}; got {list(m.shape)} {m.dtype}",
                                      field=mname)  # fmt: skip
        s.frames.check(job.frames)
        s.sizes.check(job.width, job.height)
        if not 1 <= job.steps <= s.max_steps:
            raise InvalidArgument(
                f"num_steps must be in 1..{s.max_steps}; got {job.steps}", field="num_steps"
            )
        check_guidance(job.guidance, "guidance_scale")
        check_guidance(job.guidance_2, "guidance_scale_2")
        if job.guidance_2 and not self.two_experts:
            raise InvalidArgument(
                "guidance_scale_2 sets the low-noise expert's scale; this model has one expert — leave it 0",
                field="guidance_scale_2",
            )
        if job.adapter:
            self._check_adapter(job)
        if job.image is not None:
            raise InvalidArgument(f"image: image-to-video is not served yet; {self.name} runs text-to-video",
                                  field="image")  # fmt: skip
        if encoder_model and self.encoder and encoder_model != self.encoder:
            raise FailedPrecondition(
                f"text embeddings come from encoder {encoder_model}, but this model's directory has {self.encoder}; "
                "serve the encoder and the denoiser from the same Wan directory",
                reason="ENCODER_MISMATCH",
            )

    def _check_adapter(self, job: DenoiseJob) -> None:
        s = job.adapter_strength
        if not math.isfinite(s) or not 0 < s <= 2:
            raise InvalidArgument(f"adapter_strength must be in (0, 2]; got {s}", field="adapter_strength")
        if not self.experts:
            # the Ray driver: its experts are on shards, which take adapters only for the built-in model
            raise FailedPrecondition(
                f"adapter: LoRAs for {self.name} are applied by the local executor only; this denoiser runs "
                "its experts on Ray shards (serve it with --executor local to use adapters)",
                reason="ADAPTER_UNSUPPORTED",
            )
        self.loras.get(job.adapter)  # NotFound / FailedPrecondition (ADAPTER_MISMATCH); loads and caches it

    def adapter_infos(self) -> list[dict]:
        """The installed LoRAs this process can apply, for ModelInfo.adapters (none on a Ray driver)."""
        return self.loras.infos() if self.experts else []

    # --- sampling --------------------------------------------------------------------------------------
    def guidance(self, job: DenoiseJob) -> tuple[float, float]:
        """(high noise, low noise) scales: WanPipeline's guidance_scale and guidance_scale_2 (the latter
        defaulting to the former), 0 meaning the model's defaults."""
        d_high, d_low = self.preset.guidance
        high = job.guidance or d_high
        low = job.guidance_2 or job.guidance or d_low
        return high, (low if self.two_experts else high)

    def start(self, job: DenoiseJob) -> _State:
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(job.steps, device=self.device)
        scheduler.set_begin_index(0)
        shape = (
            1,
            self.channels,
            (job.frames - 1) // self.t_stride + 1,
            job.height // self.s_stride,
            job.width // self.s_stride,
        )
        generator = torch.Generator().manual_seed(int(job.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        latents = self._randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        high, low = self.guidance(job)
        cfg = high > 1.0  # WanPipeline.do_classifier_free_guidance reads guidance_scale only
        return _State(
            job=job,
            latents=latents,
            total=len(scheduler.timesteps),
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            text=job.text.to(self.device, self.dtype),
            negative=job.negative.to(self.device, self.dtype) if cfg else None,
            guidance=(high, low),
            lora=self.loras.get(job.adapter) if job.adapter else None,
        )

    def expert_for(self, state: _State) -> str:
        if self.boundary_timestep is None:
            return "transformer"
        return "high_noise" if bool(state.t >= self.boundary_timestep) else "low_noise"

    def _adapter_key(self, expert: str, state: _State) -> tuple[str, float] | None:
        """The LoRA (file version included) and strength this expert runs the request with."""
        lora = state.lora
        if lora is None or expert not in lora.parts:
            return None
        return (lora.key, float(state.job.adapter_strength))

    def batch_key(self, state: _State) -> Hashable:
        expert = self.expert_for(state)
        # one LoRA at one strength per forward: requests with different ones never share a batch
        return (
            expert,
            tuple(state.latents.shape),
            state.negative is not None,
            self._adapter_key(expert, state),
        )

    def _timestep(self, state: _State) -> torch.Tensor:
        t = state.t
        if self.dir.expand_timesteps:
            # TI2V-5B: one timestep per latent patch, built as the pipeline builds it (a 2x2 patch grid)
            ones = torch.ones(state.latents.shape[2:], dtype=torch.float32, device=state.latents.device)
            return (ones[:, ::2, ::2] * t).flatten()  # (F * H/2 * W/2,)
        return t

    def forward(self, expert: str, states: Sequence[_State]) -> list[torch.Tensor]:
        model = self.experts[expert]
        x = torch.cat([s.latents for s in states]).to(self.dtype)  # (n, C, F, H, W)
        timestep = torch.stack([self._timestep(s) for s in states])  # (n,) or (n, seq)
        text = torch.cat([s.text for s in states])  # (n, 512, D)
        cfg = states[0].negative is not None  # one value per batch (batch_key)
        first = states[0]  # one LoRA and strength per batch (batch_key)
        self.loras.use(
            expert, first.lora if self._adapter_key(expert, first) else None, first.job.adapter_strength
        )

        def dit(x, timestep, text):
            return model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

        with torch.inference_mode():
            if not cfg:
                out = dit(x, timestep, text)
            elif self.cfg_batch:  # (n, ...) -> (2n, ...): conditional then unconditional, one forward
                negative = torch.cat([s.negative for s in states])
                out = dit(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([text, negative]))
            else:
                out = torch.cat(
                    [dit(x, timestep, text), dit(x, timestep, torch.cat([s.negative for s in states]))]
                )
        n = len(states)
        if not cfg:
            return list(out.split(1))
        g = [s.guidance[0] if expert != "low_noise" else s.guidance[1] for s in states]
        cond, uncond = out[:n], out[n:]
        return [uncond[i : i + 1] + g[i] * (cond[i : i + 1] - uncond[i : i + 1]) for i in range(n)]

    def step(self, state: _State, prediction: torch.Tensor) -> float:
        t = state.t
        with torch.inference_mode():
            state.latents = state.scheduler.step(prediction, t, state.latents, return_dict=False)[0]
        state.step += 1
        return float(t) / self.num_train_timesteps

    def remote_state(self, state: _State) -> _State:
        # the scheduler (multistep history) stays with the loop; the texts travel once, in the state
        empty = torch.empty(0)
        job = dataclasses.replace(state.job, text=empty, text_mask=empty, negative=empty, negative_mask=empty)
        return dataclasses.replace(state, latents=None, experts_used=[], scheduler=None, cache=None, job=job)

    def parameters(self, expert: str) -> int:
        model = self.experts.get(expert)
        return sum(p.numel() for p in model.parameters()) if model is not None else 0

    # --- decoding ----------------------------------------------------------------------------------------
    def decode_float(self, state: _State) -> Iterator[np.ndarray]:
        """Frames as float32 (n, H, W, 3) in [0, 1] — WanPipeline's output_type="np" — one latent frame's
        worth at a time (1 frame, then 4 per latent frame)."""
        for chunks in self.decode_float_batch([state]):
            yield chunks[0]

    def decode_float_batch(self, states: Sequence[_State]) -> Iterator[list[np.ndarray]]:
        """decode_float for requests of one latent shape at once: the VAE's causal decoder runs on the
        batch (its cache keeps a batch dimension), one latent frame at a time; per chunk, one array
        per state. A batch of one computes exactly what WanPipeline's decode does."""
        vae = self.vae
        if vae is None:
            raise RuntimeError("this WanBackend was loaded without its VAE (vae=False): it cannot decode")
        cfg = vae.config
        dev = next(vae.parameters()).device
        # inference mode is entered per chunk, never held across a yield: generators of several requests
        # advance on one thread (the executor's), and a mode held open by one would be closed by another
        with torch.inference_mode():
            z = torch.cat([s.latents for s in states]).to(dev, dtype=vae.dtype)
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            z = z / inv_std + mean
            x = vae.post_quant_conv(z)  # a 1x1x1 conv: over all latent frames at once, as _decode does
        cache: list = [None] * self._decoder_convs  # the causal convs' last frames, these requests' own
        for i in range(x.shape[2]):
            with torch.inference_mode():
                out = vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
                if cfg.patch_size is not None:
                    out = self._unpatchify(out, patch_size=cfg.patch_size)
                out = torch.clamp(out, min=-1.0, max=1.0)  # (B, 3, n, H, W)
                frames = (out.permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(
                    0, 1
                )  # (B, n, 3, H, W), as postprocess
                chunks = [f.cpu().permute(0, 2, 3, 1).float().numpy() for f in frames]
            yield chunks

    def decode_batch(self, states: Sequence[_State]) -> Iterator[list[np.ndarray]]:
        for chunks in self.decode_float_batch(states):
            yield [(f * 255).round().astype(np.uint8) for f in chunks]

    def decode(self, state: _State) -> Iterator[np.ndarray]:
        for frames in self.decode_float(state):
            yield (frames * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
