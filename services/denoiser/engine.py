"""The denoiser's settings, the model backend they select, and the default model's engine.

Knows nothing about gRPC. `load_backend(settings)` gives the ModelBackend the service runs (the
embedded U-Net through DenoiserEngine, or Wan from a diffusers-layout directory); the executors
drive it with the one sampler loop (backends/loop.py). `DenoiserEngine.generate()` is the default
model's reference sampler (sampling.py's Euler loop with CFG), which tests hold the backend to.

The text encoder a model needs is what the model declares, never what a file on this machine
says: the default weights record it (safetensors metadata "encoder", written by train.py, or for
weights exported before that a small `<weights>.encoder.json` beside them, tied to the weights'
version); Wan directories name it by their tokenizer and text encoder (`umt5@<id>`). Requests
carry the encoder's identity (EncodeResponse.model) and a mismatch is FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.denoiser.backends.base import DenoiseJob  # re-exported: callers import it from here
from services.denoiser.lora import LRU, Adapter, AdapterSlot, check_name
from services.denoiser.model import (
    ATTENTION_BACKENDS,
    MODELS,
    ModelConfig,
    MoEDenoiser,
    count_parameters,
    set_attention,
)
from services.denoiser.sampling import cfg_velocity, flow_timesteps, sample_euler
from videomesh.adapters import NAME_RE
from videomesh.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from videomesh.hardware import cpu_bf16_is_fast
from videomesh.weights import UNTRAINED, load_into, metadata

log = logging.getLogger("videomesh.denoiser")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WAN = "wan2.2"  # the Wan backend: model_dir is a diffusers-layout Wan2.1 / Wan2.2 directory
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"  # <name>.safetensors, <tenant>/<name>.safetensors


@dataclass(frozen=True)
class DenoiserSettings:
    model: str = "default"  # a built-in model (default, tiny, ...) or "wan2.2" (needs model_dir)
    weights: Path | None = None  # default: services/denoiser/weights/<model>.safetensors
    model_dir: Path | None = None  # wan2.2: a local diffusers-layout directory (Wan-AI/*-Diffusers)
    device: str = "auto"  # auto | cpu | cuda
    # auto: built-in models in bf16 autocast on CPU, bf16/fp16 on CUDA; wan2.2 in bf16 everywhere (what
    # WanPipeline's parity is measured in; its VAE always fp32)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    # wan2.2: the CFG branches as one batch of 2n (bit-identical to WanPipeline in bf16 on CPU) or as two
    # forwards of n, as WanPipeline runs them (bit-identical in fp32 too)
    cfg_batch: bool = True
    # requests stepped in one forward by the in-process executor (0 = per model: 8 for the built-in
    # models, whose batched frames are within one level of their frames alone; 4 for wan2.2, whose
    # texts are all 512 tokens and batch bit for bit); the gateway sizes its slots from it
    max_batch: int = 0
    # seconds a new batch waits for more requests before its first step (later ones join between steps)
    batch_wait: float = 0.0
    # requests that finish sampling in the same tick decode as one batch, up to this many. 1 (each alone)
    # keeps every request's frames bit for bit what it gets alone (WanPipeline's, for Wan); more decodes
    # faster (4 tiny-Wan VAE decodes 1.1 -> 0.6-0.85 s on 2 CPU cores) with frames within one level
    decode_batch: int = 1
    adapters_dir: Path | None = None  # brand style adapters (LoRA); default: services/denoiser/adapters
    adapter_cache: int = 64  # adapters kept loaded (least recently used dropped; ~1.5 MB each, default model)
    # long attention sequences on CUDA: auto (xformers if installed, else sdpa) | xformers | sdpa | matmul
    attention: str = "auto"
    # where the built-in model's experts run: torch | onnx (onnxruntime, CPU) | tensorrt (CUDA) | compile
    # (torch.compile); the exported graphs are cached in accel_cache (default ~/.cache/videomesh/accel)
    runtime: str = "torch"
    accel_cache: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = -1  # Prometheus /metrics on host:port; -1 = off, 0 = a free port
    threads: int = 0
    executor: str = "local"  # local (in-process) | ray (expert shards as placed Ray actors)
    ray_address: str = ""  # join this cluster ("" = $RAY_ADDRESS or a local Ray instance)
    ray_replicas: int = 1
    ray_strategy: str = "PACK"  # placement-group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD

    def validate(self) -> None:
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray; got {self.executor!r}")
        if self.ray_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"ray_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD; got {self.ray_strategy!r}"
            )
        if self.model == WAN:
            if self.model_dir is None:
                raise ValueError(
                    f"model {WAN} needs model_dir: a local diffusers-layout Wan directory "
                    "(--model-dir DIR, e.g. a downloaded Wan-AI/Wan2.2-T2V-A14B-Diffusers)"
                )
            from videomesh.model_dir import WanModelDir

            d = WanModelDir.open(self.model_dir)  # ModelDirError (a ValueError) naming the file and the fix
            d.require(
                *(("transformer", "transformer_2") if d.two_experts else ("transformer",)), "vae", "scheduler"
            )
        elif self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(MODELS) + [WAN]}")
        elif self.model_dir is not None:
            raise ValueError(
                f"model_dir is for --model {WAN}; model {self.model!r} loads weights (--weights)"
            )
        if self.max_batch < 0:
            raise ValueError(f"max_batch must be 0 (per model) or more; got {self.max_batch}")
        if self.decode_batch < 1:
            raise ValueError(f"decode_batch must be at least 1; got {self.decode_batch}")
        if not 0 <= self.batch_wait <= 10:
            raise ValueError(f"batch_wait must be in 0..10 seconds; got {self.batch_wait}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32; got {self.precision!r}")
        if self.adapter_cache < 1:
            raise ValueError(f"adapter_cache must be at least 1; got {self.adapter_cache}")
        from videomesh.accel import check_runtime

        check_runtime(self.runtime)
        if self.runtime != "torch" and self.model == WAN:
            raise ValueError(f"runtime={self.runtime} is for the built-in models; {WAN} runs on torch")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}; got {self.attention!r}"
            )


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "fp32":
        return torch.float32
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cpu":  # auto: by capability (videomesh/hardware.py has the measurements)
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_reason(setting: str, device: torch.device) -> str:
    """Why pick_dtype chose what it chose, for the start-up log."""
    if setting != "auto":
        return f"precision={setting} as configured"
    if device.type != "cpu":
        return "auto: bf16 where CUDA supports it, else fp16"
    from videomesh.hardware import describe_cpu

    why = "has AMX-BF16" if cpu_bf16_is_fast() else "no AMX-BF16: bf16 would be emulated or slower than fp32"
    return f"auto: {describe_cpu()} {why}"


def declared_encoder(cfg: ModelConfig, path: Path, version: str) -> str:
    """The text encoder ("<name>@<version>") the weights at `path` (of version `version`) were trained
    with: their metadata, else `<stem>.encoder.json` beside them when it names this version; untrained
    weights pair with an untrained encoder; "" when the weights do not say (no check then)."""
    if version == UNTRAINED:
        return f"{cfg.encoder}@{UNTRAINED}"
    declared = metadata(path).get("encoder", "")
    side = path.with_name(f"{path.stem}.encoder.json")
    if not declared and side.exists():
        record = json.loads(side.read_text())
        if record.get("weights") == version:
            declared = record.get("encoder", "")
    if not declared:
        log.warning("%s declares no text encoder: requests are not checked against one", path)
    return declared


class DenoiserEngine:
    def __init__(self, settings: DenoiserSettings):
        self.settings = settings
        self.cfg: ModelConfig = MODELS[settings.model]
        self.model: MoEDenoiser | None = None
        self.version = UNTRAINED
        self.encoder_model = ""
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.attention = "matmul"  # the kernel for long attention sequences (CUDA only)
        # name -> (file mtime, adapter), loaded on use, least recently used first
        self._adapters = LRU(settings.adapter_cache)
        self._adapters_lock = threading.Lock()
        self._slot: AdapterSlot | None = None
        self._lock = threading.Lock()  # one generation at a time per engine (the executor batches later)

    # --- lifecycle --------------------------------------------------------------------------
    def load(self) -> None:
        self.device = pick_device(self.settings.device)
        self.dtype = pick_dtype(self.settings.precision, self.device)
        self.attention = set_attention(self.settings.attention) if self.device.type == "cuda" else "matmul"
        torch.manual_seed(0)  # untrained weights are identical on every replica
        model = MoEDenoiser(self.cfg).eval()
        path = self.settings.weights or WEIGHTS_DIR / f"{self.cfg.name}.safetensors"
        self.version = load_into(model, path)
        self.encoder_model = declared_encoder(self.cfg, Path(path), self.version)
        self.model = model.to(self.device)
        self._slot = AdapterSlot(self.model)
        if self.settings.runtime != "torch":  # ONNX Runtime / TensorRT / torch.compile (videomesh/accel.py)
            from services.denoiser.accel import accelerate_denoiser

            accelerate_denoiser(self.model, self.settings.runtime, self.settings.accel_cache,
                                fp16=self.dtype != torch.float32, threads=self.settings.threads,
                                max_batch=max(16, self.settings.max_batch))  # fmt: skip
        log.info(
            "denoiser %s@%s on %s/%s (%s; attention: %s; runtime: %s), %d params per expert",
            self.cfg.name,
            self.version,
            self.device,
            self.dtype,
            precision_reason(self.settings.precision, self.device),
            self.attention,
            self.settings.runtime,
            count_parameters(model.experts["high_noise"]),
        )

    # --- brand style adapters -------------------------------------------------------------------
    @property
    def adapters_dir(self) -> Path:
        return Path(self.settings.adapters_dir or ADAPTERS_DIR)

    def adapter_names(self) -> list[str]:
        """Installed adapters: <dir>/<name>.safetensors (public), <dir>/<tenant>/<name>.safetensors."""
        d = self.adapters_dir
        names = [p.stem for p in d.glob("*.safetensors")] + [
            f"{p.parent.name}/{p.stem}" for p in d.glob("*/*.safetensors")
        ]
        return sorted(n for n in names if NAME_RE.match(n))

    def adapter(self, name: str) -> Adapter:
        """Load and check an installed adapter (again when its file changed); NotFound for a name
        that is not installed (any more)."""
        try:
            check_name(name)
        except ValueError as e:
            raise InvalidArgument(str(e), field="adapter") from None
        path = self.adapters_dir / f"{name}.safetensors"
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            with self._adapters_lock:
                self._adapters.pop(name)
            raise NotFound(f"no style adapter {name!r} is installed", reason="ADAPTER_NOT_FOUND") from None
        with self._adapters_lock:
            cached = self._adapters.get(name)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        adapter = Adapter.load(path, name)
        if adapter.base_model != self.cfg.name:
            raise FailedPrecondition(f"adapter {name!r} was trained for model {adapter.base_model!r}, this denoiser "
                                     f"runs {self.cfg.name!r}", reason="ADAPTER_MISMATCH")  # fmt: skip
        if adapter.base_version and adapter.base_version != self.version:
            raise FailedPrecondition(f"adapter {name!r} was trained on weights {adapter.base_version}, this denoiser "
                                     f"runs {self.version}; retrain it (videomesh train-adapter)",
                                     reason="ADAPTER_MISMATCH")  # fmt: skip
        if adapter.base_encoder and self.encoder_model and adapter.base_encoder != self.encoder_model:
            raise FailedPrecondition(f"adapter {name!r} was trained on text encoder {adapter.base_encoder}, this "
                                     f"denoiser reads {self.encoder_model}; retrain it (videomesh train-adapter)",
                                     reason="ADAPTER_MISMATCH")  # fmt: skip
        with self._adapters_lock:
            self._adapters.put(name, (mtime, adapter))
        return adapter

    @property
    def trained(self) -> bool:
        return self.version != UNTRAINED

    # --- validation -------------------------------------------------------------------------
    def check(self, job: DenoiseJob, encoder_model: str = "") -> None:
        cfg = self.cfg
        td = cfg.unet.text_dim
        for name, t, m in (
            ("text_embeddings", job.text, job.text_mask),
            ("negative_embeddings", job.negative, job.negative_mask),
        ):
            if t.ndim != 3 or t.shape[0] != 1 or t.shape[2] != td:
                raise InvalidArgument(f"{name}: expected shape (1, L, {td}); got {list(t.shape)}", field=name)
            mname = name.replace("embeddings", "mask")
            if m.ndim != 2 or m.shape != t.shape[:2] or m.dtype != torch.bool:
                raise InvalidArgument(
                    f"{mname}: expected bool shape {list(t.shape[:2])}; got {list(m.shape)} {m.dtype}",
                    field=mname,
                )
        if job.frames != cfg.frames:
            raise InvalidArgument(
                f"num_frames: this model generates {cfg.frames} frames; got {job.frames}", field="num_frames"
            )
        if (job.width, job.height) != (cfg.width, cfg.height):
            raise InvalidArgument(
                f"size: this model generates {cfg.width}x{cfg.height}; got {job.width}x{job.height}",
                field="width",
            )
        if not 1 <= job.steps <= cfg.max_steps:
            raise InvalidArgument(
                f"num_steps must be in 1..{cfg.max_steps}; got {job.steps}", field="num_steps"
            )
        if not 0 <= job.guidance <= 30 or not np.isfinite(job.guidance):
            raise InvalidArgument(
                f"guidance_scale must be in 0..30 (0 = default); got {job.guidance}", field="guidance_scale"
            )
        if job.adapter:
            self.adapter(job.adapter)
            if not (0 < job.adapter_strength <= 2) or not np.isfinite(job.adapter_strength):
                raise InvalidArgument(f"adapter_strength must be in (0, 2]; got {job.adapter_strength}",
                                      field="adapter_strength")  # fmt: skip
        if encoder_model and self.encoder_model and encoder_model != self.encoder_model:
            raise FailedPrecondition(
                f"text embeddings come from encoder {encoder_model}, but this denoiser's weights were trained "
                f"with {self.encoder_model}; deploy matching encoder and denoiser weights",
                reason="ENCODER_MISMATCH",
            )

    # --- generation -------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def initial_noise(self, job: DenoiseJob) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(job.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        return torch.randn((1, job.frames, self.cfg.unet.channels, job.height, job.width), generator=g)

    def generate(
        self,
        job: DenoiseJob,
        *,
        on_step: Callable[[int, int, str, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """Run the sampler; return (T, H, W, 3) uint8 RGB frames."""
        if self.model is None:
            raise Unavailable("the denoiser is still loading its model; retry shortly", retry_after=2.0)
        model = self.model
        dev = self.device
        x = self.initial_noise(job).to(dev)
        ts = flow_timesteps(job.steps, self.cfg.shift)

        def net(xb, tb, text, mask):
            with self._autocast():
                return model(xb, tb, text, mask).float()

        def guidance(t: float) -> float:
            return job.guidance or model.guidance_for(model.expert_for(t))

        velocity = cfg_velocity(
            net,
            (job.text.to(dev).float(), job.text_mask.to(dev)),
            (job.negative.to(dev).float(), job.negative_mask.to(dev)),
            guidance,
        )

        def callback(step: int, total: int, t: float):
            if on_step:
                on_step(step, total, model.expert_for(t), t)

        t0 = time.perf_counter()
        with self._lock:
            # the base weights come back bit for bit when the next request asks for none
            self._slot.use(self.adapter(job.adapter) if job.adapter else None, job.adapter_strength)
            with torch.inference_mode():
                out = sample_euler(velocity, x, ts, callback=callback, should_stop=should_stop)
        log.debug("generated in %.2fs", time.perf_counter() - t0)
        frames = ((out[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (T, C, H, W)
        return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def load_backend(settings: DenoiserSettings, *, experts: tuple[str, ...] | None = None, decode: bool = True):
    """The ModelBackend `settings` select, loaded: the built-in U-Net (all of it; a Ray shard drops the
    other expert) or Wan from settings.model_dir with the named experts (None = all; a Ray driver
    loads none, a shard one) and, when `decode`, its VAE."""
    if settings.model == WAN:
        from services.denoiser.backends.wan import WanBackend

        device = pick_device(settings.device)
        precision = "bf16" if settings.precision == "auto" else settings.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        # Wan LoRAs (brand styles, few-step distillation) from the same adapters directory
        return WanBackend.load(settings.model_dir, dtype=dtype, device=device, experts=experts,
                               cfg_batch=settings.cfg_batch, vae=decode,
                               adapters_dir=settings.adapters_dir or ADAPTERS_DIR,
                               adapter_cache=min(settings.adapter_cache, 4))  # fmt: skip
    from services.denoiser.backends.default import DefaultBackend

    engine = DenoiserEngine(settings)
    engine.load()
    if experts is not None:  # a shard: only its expert stays (the other's layers are freed)
        for name in [n for n in engine.model.experts if n not in experts]:
            del engine.model.experts[name]
    return DefaultBackend(engine)
