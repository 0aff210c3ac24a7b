"""The Wan backend against diffusers' WanPipeline: same frames for the same settings, bit for bit in bf16.

Tiny random components (tests/wan_tiny.py) are saved in the diffusers layout and loaded through
the production path (WanBackend.load, UMT5TextEncoder.from_dir) and through
WanPipeline.from_pretrained, as a user would load the reference.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("ftfy")

from services.denoiser.backends.base import DenoiseJob  # noqa: E402
from services.denoiser.backends.loop import advance, run, sample  # noqa: E402
from services.denoiser.backends.wan import WanBackend  # noqa: E402
from services.encoder.umt5 import UMT5TextEncoder, prompt_clean  # noqa: E402
from tests.wan_tiny import save_tiny_wan  # noqa: E402
from videomesh.errors import InvalidArgument, NotFound  # noqa: E402
from videomesh.model_dir import ModelDirError  # noqa: E402

SIZES = {"a14b": (32, 16), "t2v": (32, 16), "ti2v5b": (64, 32)}  # (width, height): not square, to catch swaps
PROMPT, NEGATIVE = "a red ball moving left on a white background", "blurry, static"


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {layout: save_tiny_wan(root / layout, layout) for layout in SIZES}


_cache: dict = {}


def _loaded(kind, wan_dirs, layout, dtype):
    """Load once per module: the pipeline, the backend and the encoder of (layout, dtype)."""
    key = (kind, layout, dtype)
    if key not in _cache:
        d = wan_dirs[layout]
        if kind == "pipe":
            from diffusers import AutoencoderKLWan, WanPipeline

            vae = AutoencoderKLWan.from_pretrained(d, subfolder="vae", dtype=torch.float32)
            pipe = WanPipeline.from_pretrained(d, vae=vae, dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
            _cache[key] = pipe
        elif kind == "backend":
            _cache[key] = WanBackend.load(d, dtype=dtype)
        else:
            _cache[key] = UMT5TextEncoder.from_dir(d, dtype=dtype)
    return _cache[key]


@pytest.fixture(scope="module", autouse=True)
def _drop_cache():
    yield
    _cache.clear()


def _job(encoder, prompt=PROMPT, negative=NEGATIVE, **kw) -> DenoiseJob:
    enc = encoder.encode([prompt, negative])
    fields = dict(frames=9, width=32, height=16, seed=0, steps=4, guidance=5.0)
    fields.update(kw)
    return DenoiseJob(text=enc.states[:1], text_mask=enc.mask[:1], negative=enc.states[1:],
                      negative_mask=enc.mask[1:], **fields)  # fmt: skip


def _reference(pipe, job: DenoiseJob, prompt=PROMPT, negative=NEGATIVE) -> np.ndarray:
    kw = {"guidance_scale_2": job.guidance_2} if job.guidance_2 else {}
    out = pipe(prompt, negative_prompt=negative, num_frames=job.frames, height=job.height, width=job.width,
               num_inference_steps=job.steps, guidance_scale=job.guidance,
               generator=torch.Generator().manual_seed(job.seed), output_type="np", **kw)  # fmt: skip
    return out.frames[0]  # (T, H, W, 3) float32 in [0, 1]


def _backend_float(backend, job) -> tuple[np.ndarray, list[str]]:
    state = backend.start(job)
    while not state.done:
        advance(backend, [state])
    return np.concatenate(list(backend.decode_float(state))), state.experts_used


# --- parity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["a14b", "t2v", "ti2v5b"])
def test_frames_equal_wan_pipeline_bit_for_bit_in_bf16(wan_dirs, layout):
    pipe = _loaded("pipe", wan_dirs, layout, torch.bfloat16)
    backend = _loaded("backend", wan_dirs, layout, torch.bfloat16)
    encoder = _loaded("encoder", wan_dirs, layout, torch.bfloat16)
    w, h = SIZES[layout]
    job = _job(encoder, width=w, height=h, seed=7, guidance_2=3.0 if layout == "a14b" else 0.0)
    backend.check_request(job)
    ref = _reference(pipe, job)
    out, _ = _backend_float(backend, job)
    assert out.shape == ref.shape == (9, h, w, 3)
    assert np.array_equal(out, ref), f"max abs diff {np.abs(out - ref).max()}"
    frames = sample(backend, job)  # the uint8 frames the service streams
    assert frames.dtype == np.uint8 and np.array_equal(frames, (ref * 255).round().astype(np.uint8))
    assert frames.std() > 0  # not a blank clip


@pytest.mark.parametrize("layout", ["a14b", "t2v", "ti2v5b"])
def test_frames_match_wan_pipeline_within_1e6_in_fp32(wan_dirs, layout):
    pipe = _loaded("pipe", wan_dirs, layout, torch.float32)
    encoder = _loaded("encoder", wan_dirs, layout, torch.float32)
    w, h = SIZES[layout]
    job = _job(encoder, width=w, height=h, seed=3)
    ref = _reference(pipe, job)
    # the CFG branches as two forwards, as the pipeline runs them (measured: 0.0)
    split = WanBackend.load(wan_dirs[layout], dtype=torch.float32, cfg_batch=False)
    assert np.abs(_backend_float(split, job)[0] - ref).max() <= 1e-6
    # as one batch of 2: fp32 GEMMs on CPU choose other kernels for a batch of 2 than of 1, about 1 ulp
    # per forward; the 5B VAE amplifies it (measured over seeds 0-5: <= 1.8e-7 for the 16-channel
    # layouts, <= 3.0e-6 for TI2V-5B)
    batched = _loaded("backend", wan_dirs, layout, torch.float32)
    assert np.abs(_backend_float(batched, job)[0] - ref).max() <= (1e-5 if layout == "ti2v5b" else 1e-6)


def test_experts_switch_exactly_at_the_boundary(wan_dirs):
    pipe = _loaded("pipe", wan_dirs, "a14b", torch.bfloat16)
    backend = _loaded("backend", wan_dirs, "a14b", torch.bfloat16)
    encoder = _loaded("encoder", wan_dirs, "a14b", torch.bfloat16)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, kw, n=n: calls.append((n, int(kw["timestep"][0]))),
                                         with_kwargs=True)
             for n, m in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2))]  # fmt: skip
    job = _job(encoder, steps=6, guidance=4.0, guidance_2=2.5)
    try:
        ref = _reference(pipe, job)
    finally:
        for hk in hooks:
            hk.remove()
    events = []
    frames = np.concatenate(list(run(backend, job, on_step=lambda *a: events.append(a))))
    assert np.array_equal(frames, (ref * 255).round().astype(np.uint8))
    pipeline_experts = [n for n, _ in calls[::2]]  # two calls per step: conditional, unconditional
    ours = [e for _, _, e, _ in events]
    assert ours == pipeline_experts and set(ours) == {"high_noise", "low_noise"}
    assert [s for s, *_ in events] == list(range(1, 7)) and all(total == 6 for _, total, _, _ in events)
    for (_, _, expert, t), (_, ts) in zip(events, calls[::2], strict=True):
        assert expert == ("high_noise" if ts >= 875 else "low_noise") and t == ts / 1000
    # exactly at the boundary timestep: t == boundary_ratio * 1000 is still the high-noise expert's
    state = backend.start(job)
    state.timesteps = torch.tensor([876, 875, 874])
    assert [backend.expert_for(dataclasses.replace(state, step=i)) for i in range(3)] == [
        "high_noise", "high_noise", "low_noise",
    ]  # fmt: skip


def test_interleaved_requests_give_the_frames_each_gives_alone(wan_dirs):
    """Three requests stepped together by a step-level batcher (joining at different ticks, batched
    per expert and latent shape) give the frames each gives alone."""
    backend = _loaded("backend", wan_dirs, "a14b", torch.bfloat16)
    encoder = _loaded("encoder", wan_dirs, "a14b", torch.bfloat16)
    jobs = [
        _job(encoder, "a blue box moving right", "", seed=1, steps=5, guidance=4.0, guidance_2=3.0),
        _job(encoder, "一个红色的球向左移动", "blurry", seed=2, steps=4, guidance=6.0),
        _job(encoder, "白い背景の上を跳ねる猫", "", seed=3, steps=6, guidance=3.5, width=16, height=32),
    ]
    alone = [sample(backend, j) for j in jobs]
    states, batches = [], []
    real_forward = backend.forward

    def counting_forward(expert, group):
        batches.append(len(group))
        return real_forward(expert, group)

    backend.forward = counting_forward
    try:
        for tick in range(12):
            if tick < len(jobs):
                states.append(backend.start(jobs[tick]))  # a new request joins between steps
            advance(backend, states)
    finally:
        del backend.forward
    assert all(s.done for s in states) and max(batches) == 2  # requests 0 and 1 shared forwards
    together = [np.concatenate(list(backend.decode(s))) for s in states]
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)


def test_streamed_decode_is_the_whole_decode(wan_dirs):
    backend = _loaded("backend", wan_dirs, "ti2v5b", torch.bfloat16)
    encoder = _loaded("encoder", wan_dirs, "ti2v5b", torch.bfloat16)
    job = _job(encoder, frames=13, width=32, height=64, steps=2)
    state = backend.start(job)
    while not state.done:
        advance(backend, [state])
    chunks = list(backend.decode_float(state))
    assert [len(c) for c in chunks] == [1, 4, 4, 4]  # one latent frame at a time
    vae, cfg = backend.vae, backend.vae.config
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
    z = state.latents.float() / (1.0 / std) + mean
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]  # (1, 3, T, H, W)
    whole = (whole[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).numpy()
    assert np.array_equal(np.concatenate(chunks), whole)


# --- text ---------------------------------------------------------------------------------------------------


def test_umt5_states_equal_the_pipelines_and_are_zero_padded_to_512(wan_dirs):
    pipe = _loaded("pipe", wan_dirs, "a14b", torch.bfloat16)
    encoder = _loaded("encoder", wan_dirs, "a14b", torch.bfloat16)
    long_prompt = " ".join(["红色的球"] * 150)  # 600+ tokens: truncated to 512, as WanPipeline does
    prompts = [
        PROMPT,
        "一个红色的球在街道上移动",
        "夜の街を歩く猫",
        "  &amp;lt;b&amp;gt; spaced\n\tout ",
        long_prompt,
    ]
    enc = encoder.encode(prompts + [""])
    assert enc.states.shape == (6, 512, 32) and enc.states.dtype == torch.bfloat16
    for i, p in enumerate(prompts):
        with torch.no_grad():  # as WanPipeline.__call__ runs it (with autograd on, bf16 CPU kernels differ)
            ref, neg = pipe.encode_prompt(p, negative_prompt=None, max_sequence_length=512)
        assert torch.equal(enc.states[i : i + 1], ref)
        assert torch.equal(enc.states[-1:], neg)  # no negative prompt encodes as ""
        n = enc.lengths[i]
        assert enc.mask[i].sum() == n and not enc.states[i, n:].any() and enc.states[i, n - 1].any()
    assert enc.lengths[-2] == 512 and enc.truncated[-2] > 0 and enc.truncated[:-2] == [0] * 4


def test_prompt_clean_is_diffusers_prompt_clean():
    from diffusers.pipelines.wan import pipeline_wan

    for text in [
        "  a  cat\n\n",
        "&amp;amp; caf\u00c3\u00a9",
        "\u3000全角\u3000空白\u3000",
        "x\u00a0y\u2028z",
        "",
    ]:
        assert prompt_clean(text) == pipeline_wan.prompt_clean(text)


# --- errors -------------------------------------------------------------------------------------------------


def test_request_errors_say_the_fix(wan_dirs):
    backend = _loaded("backend", wan_dirs, "a14b", torch.bfloat16)
    encoder = _loaded("encoder", wan_dirs, "a14b", torch.bfloat16)
    job = _job(encoder)
    backend.check_request(job)
    cases = [
        (dict(frames=8), "num_frames must be 4k\\+1 for this VAE; got 8 — use 9"),
        (dict(frames=11), "got 11 — use 9 or 13"),
        (dict(width=40), "width must be a multiple of 16 .*VAE stride 8 x patch 2.*; got 40 — use 32 or 48"),
        (dict(height=20), "height must be a multiple of 16.*got 20 — use 16"),
        (dict(steps=0), "num_steps must be in 1..200"),
        (dict(guidance=-1.0), "guidance_scale must be in 0..30"),
        (dict(text=job.text[:, :77]), "text_embeddings: expected float shape \\[1, 512, 32\\]"),
    ]
    for change, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            backend.check_request(dataclasses.replace(job, **change))
    with pytest.raises(NotFound, match="no style adapter 'acme/look'"):  # tests/unit/test_wan_lora.py
        backend.check_request(dataclasses.replace(job, adapter="acme/look"))
    one = _loaded("backend", wan_dirs, "ti2v5b", torch.bfloat16)
    with pytest.raises(
        InvalidArgument, match="multiple of 32 .*VAE stride 16 x patch 2.*got 48 — use 32 or 64"
    ):
        one.check_request(dataclasses.replace(job, width=48, height=32))
    with pytest.raises(InvalidArgument, match="this model has one expert"):
        one.check_request(dataclasses.replace(job, width=64, height=32, guidance_2=3.0))


def test_model_support_publishes_the_rules(wan_dirs):
    s = _loaded("backend", wan_dirs, "a14b", torch.bfloat16).supports()
    assert (s.fps, s.text_length, s.text_dim, s.default_frames) == (16.0, 512, 32, 81)
    assert (1280, 720) in s.sizes.official and s.sizes.multiple == 16 and s.frames.step == 4
    assert [(e.name, e.boundary, e.default_guidance) for e in s.experts] == [
        ("high_noise", 0.875, 4.0), ("low_noise", 0.875, 3.0),
    ]  # fmt: skip
    encoder = _loaded("encoder", wan_dirs, "a14b", torch.bfloat16)
    assert s.encoder == encoder.name and s.encoder.startswith("umt5@")
    five = _loaded("backend", wan_dirs, "ti2v5b", torch.bfloat16).supports()
    assert (
        five.sizes.multiple == 32 and five.fps == 24.0 and [e.name for e in five.experts] == ["transformer"]
    )


def test_bad_directories_are_clear_errors(wan_dirs, tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        WanBackend.load(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="model_index.json not found: expected a diffusers pipeline"):
        WanBackend.load(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="model_index.json: not readable JSON"):
        WanBackend.load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        ModelDirError, match="_class_name is 'StableDiffusionPipeline'; expected 'WanPipeline'"
    ):
        WanBackend.load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(ModelDirError, match="image-to-video .* not served yet"):
        UMT5TextEncoder.from_dir(tmp_path)

    d = tmp_path / "copy"
    shutil.copytree(wan_dirs["a14b"], d)
    shutil.rmtree(d / "transformer_2")
    with pytest.raises(
        ModelDirError, match="transformer_2/ not found, but model_index.json lists 'transformer_2'"
    ):
        WanBackend.load(d)
    shutil.copytree(wan_dirs["a14b"] / "transformer_2", d / "transformer_2")
    (d / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="vae: no weights"):
        WanBackend.load(d)
    shutil.rmtree(d / "text_encoder")
    with pytest.raises(ModelDirError, match="text_encoder/ not found"):
        UMT5TextEncoder.from_dir(d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(ModelDirError, match="boundary_ratio is null"):
        WanBackend.load(d)
    (d / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ModelDirError, match="component 'vae' is \\['diffusers', 'AutoencoderKL'\\]"):
        WanBackend.load(d)
