"""Wan LoRAs per request (services/denoiser/wan_lora.py) against WanPipeline with the same LoRA loaded.

Tiny random Wan2.2 T2V-A14B components (tests/wan_tiny.py) and tiny random LoRAs, in diffusers keys
and in lightx2v's original Wan keys; one latent frame and a few steps, so the module stays fast.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("ftfy")
pytest.importorskip("peft")

from services.denoiser.backends.base import DenoiseJob  # noqa: E402
from services.denoiser.backends.loop import advance  # noqa: E402
from services.denoiser.backends.wan import WanBackend  # noqa: E402
from services.denoiser.wan_lora import WanLoras  # noqa: E402
from services.encoder.umt5 import UMT5TextEncoder  # noqa: E402
from tests.wan_tiny import save_tiny_lora, save_tiny_wan  # noqa: E402
from videomesh.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402

# the reference pipeline holds several LoRAs at once, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
PROMPT, NEGATIVE = "a red ball moving left on a white background", "blurry, static"
W, H, FRAMES = 32, 16, 1


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The tiny A14B directory, its adapters, the backend, the encoder and the reference pipeline."""
    from diffusers import AutoencoderKLWan, WanPipeline

    root = tmp_path_factory.mktemp("wanlora")
    d = save_tiny_wan(root / "a14b", "a14b")
    vae = AutoencoderKLWan.from_pretrained(d, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(d, vae=vae, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ad = root / "adapters"
    # one file for both experts (diffusers keys), a lightx2v-style folder (one file per expert),
    # a tenant's high-noise-only folder
    save_tiny_lora(ad / "style.safetensors", pipe.transformer, seed=1, metadata={"description": "brand look"})
    save_tiny_lora(ad / "fast" / "high_noise_model.safetensors", pipe.transformer, seed=2, style="lightx2v")
    save_tiny_lora(ad / "fast" / "low_noise_model.safetensors", pipe.transformer_2, seed=3, style="lightx2v")
    save_tiny_lora(ad / "acme" / "early" / "high_noise.safetensors", pipe.transformer, seed=4)
    backend = WanBackend.load(d, dtype=torch.bfloat16, adapters_dir=ad)
    encoder = UMT5TextEncoder.from_dir(d, dtype=torch.bfloat16)
    return {"dir": d, "adapters": ad, "pipe": pipe, "backend": backend, "encoder": encoder}


def _job(wan, **kw) -> DenoiseJob:
    if "text" not in wan:
        wan["text"] = wan["encoder"].encode([PROMPT, NEGATIVE])
    enc = wan["text"]
    fields = dict(
        frames=FRAMES, width=W, height=H, seed=5, steps=2, guidance=5.0
    )  # steps: t=999 high, 750 low
    fields.update(kw)
    return DenoiseJob(text=enc.states[:1], text_mask=enc.mask[:1], negative=enc.states[1:],
                      negative_mask=enc.mask[1:], **fields)  # fmt: skip


def _ours(backend, job) -> tuple[np.ndarray, list[str]]:
    backend.check_request(job)
    state = backend.start(job)
    while not state.done:
        advance(backend, [state])
    return np.concatenate(list(backend.decode_float(state))), state.experts_used


def _reference(pipe, job) -> np.ndarray:
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_frames=job.frames, height=job.height, width=job.width,
                num_inference_steps=job.steps, guidance_scale=job.guidance,
                generator=torch.Generator().manual_seed(job.seed), output_type="np").frames[0]  # fmt: skip


def _base_weights(backend) -> dict[str, torch.Tensor]:
    """Every expert's own parameters (a LoRA's layers left out), copied."""
    return {f"{e}.{k.replace('.base_layer', '')}": v.detach().clone() for e, m in backend.experts.items()
            for k, v in m.state_dict().items() if "lora_" not in k}  # fmt: skip


# --- parity with WanPipeline --------------------------------------------------------------------------


def test_lora_frames_equal_wan_pipeline_bit_for_bit_and_the_base_returns_exactly(wan):
    """One file for both experts, at strength 1 and 0.5, against WanPipeline with the same file loaded
    into transformer and transformer_2 and set_adapters(weight); before and after, the base frames and
    the base weights are the same bits."""
    backend, pipe = wan["backend"], wan["pipe"]
    weights = _base_weights(backend)
    base, _ = _ours(backend, _job(wan))
    path = str(wan["adapters"] / "style.safetensors")
    pipe.load_lora_weights(path, adapter_name="style")
    pipe.load_lora_weights(path, adapter_name="style", load_into_transformer_2=True)
    outs = {}
    for strength in (1.0, 0.5):
        pipe.set_adapters("style", adapter_weights=strength)
        pipe.enable_lora()
        ref = _reference(pipe, _job(wan))
        out, experts = _ours(backend, _job(wan, adapter="style", adapter_strength=strength))
        assert set(experts) == {"high_noise", "low_noise"}  # the LoRA went through both experts
        assert np.array_equal(out, ref), f"strength {strength}: max abs diff {np.abs(out - ref).max()}"
        outs[strength] = out
    pipe.disable_lora()
    # the LoRA changes the frames, its strength too; strength s scales each LoRA layer's delta by s
    assert np.abs(outs[1.0] - base).max() > 1e-2 and not np.array_equal(outs[0.5], outs[1.0])
    lora = backend.loras.get("style")
    layer = backend.experts["low_noise"].blocks[0].attn1.to_q  # last used at strength 0.5
    assert layer.scaling[lora.key] == 0.5 * layer.lora_alpha[lora.key] / layer.r[lora.key]
    after, _ = _ours(backend, _job(wan))
    assert np.array_equal(after, base)  # the base model's bits after LoRA requests
    assert all(torch.equal(v, _base_weights(backend)[k]) for k, v in weights.items())


def test_lightx2v_two_expert_folder_four_steps_cfg_off_equals_wan_pipeline(wan):
    """A lightx2v-style folder (original Wan keys, alpha, diff_b; a different file per expert), run as
    the few-step LoRAs are: 4 steps, guidance_scale 1 — no unconditional branch — against WanPipeline
    with each file loaded into its own transformer."""
    backend, pipe = wan["backend"], wan["pipe"]
    folder = wan["adapters"] / "fast"
    pipe.load_lora_weights(str(folder / "high_noise_model.safetensors"), adapter_name="fast")
    pipe.load_lora_weights(str(folder / "low_noise_model.safetensors"), adapter_name="fast",
                           load_into_transformer_2=True)  # fmt: skip
    pipe.set_adapters("fast")
    pipe.enable_lora()  # set_adapters leaves layers disabled by an earlier disable_lora disabled
    job = _job(wan, adapter="fast", steps=4, guidance=1.0)
    try:
        ref = _reference(pipe, job)
    finally:
        pipe.disable_lora()
    calls = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, kw, n=n: calls.append((n, kw["hidden_states"].shape[0])),
                                         with_kwargs=True)
             for n, m in backend.experts.items()]  # fmt: skip
    try:
        state = backend.start(job)
        assert state.negative is None  # CFG off at guidance 1, as WanPipeline
        out, experts = _ours(backend, job)
    finally:
        for hk in hooks:
            hk.remove()
    assert np.array_equal(out, ref), f"max abs diff {np.abs(out - ref).max()}"
    assert len(calls) == 4 and all(batch == 1 for _, batch in calls)  # one conditional forward per step
    assert set(experts) == {"high_noise", "low_noise"}
    lora = backend.loras.get("fast")
    assert set(lora.parts) == {"high_noise", "low_noise"}
    high, low = (lora.parts[e][0] for e in ("high_noise", "low_noise"))
    key = "transformer.blocks.0.attn1.to_q.lora_A.weight"
    assert not torch.equal(high[key], low[key])  # each expert got its own file


# --- which adapters, which batches ------------------------------------------------------------------


def test_batches_never_mix_adapters_or_strengths(wan):
    backend = wan["backend"]
    key = {}
    for name, adapter, strength in (("base", "", 1.0), ("base_other_strength", "", 0.5), ("style", "style", 1.0),
                                    ("style_again", "style", 1.0), ("style_half", "style", 0.5),
                                    ("fast", "fast", 1.0), ("early", "acme/early", 1.0)):  # fmt: skip
        key[name] = backend.batch_key(backend.start(_job(wan, adapter=adapter, adapter_strength=strength)))
    assert key["base"] == key["base_other_strength"]  # the strength of no adapter does not matter
    assert key["style"] == key["style_again"]
    assert len({key[n] for n in ("base", "style", "style_half", "fast", "early")}) == 5
    # "acme/early" has a high-noise file only: its low-noise steps are the base model's, batched with them
    state = backend.start(_job(wan, adapter="acme/early"))
    base = backend.start(_job(wan))
    state.step = base.step = state.total - 1
    assert backend.expert_for(state) == "low_noise" and backend.batch_key(state) == backend.batch_key(base)


def test_unknown_and_unfit_adapters_are_refused_with_reasons(wan, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file, save_file

    backend = wan["backend"]
    with pytest.raises(NotFound) as e:
        backend.check_request(_job(wan, adapter="no-such-style"))
    assert e.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        backend.check_request(_job(wan, adapter="Bad Name"))
    for strength in (0.0, 2.5, float("nan")):
        with pytest.raises(InvalidArgument) as e:
            backend.check_request(_job(wan, adapter="style", adapter_strength=strength))
        assert e.value.violations[0][0] == "adapter_strength"

    ad = tmp_path / "adapters"
    torch.manual_seed(0)
    wider = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)  # fmt: skip
    save_tiny_lora(ad / "wider.safetensors", wider)  # another model's shapes
    sd = load_file(str(wan["adapters"] / "style.safetensors"))  # a layer this model lacks: block 7
    save_file({k.replace("blocks.1.", "blocks.7."): v for k, v in sd.items()}, str(ad / "deeper.safetensors"))
    save_file({"experts.high_noise.conv.lora_down": torch.zeros(2, 3), "experts.high_noise.conv.lora_up":
               torch.zeros(3, 2)}, str(ad / "builtin.safetensors"),
              metadata={"format": "videomesh-lora/1", "base_model": "default"})  # fmt: skip
    (ad / "garbage.safetensors").write_bytes(b"not a safetensors file")
    save_file({"transformer.blocks.0.attn1.to_q.weight": torch.zeros(24, 24)}, str(ad / "full.safetensors"))
    probe = WanBackend.load(wan["dir"], dtype=torch.bfloat16, adapters_dir=ad, vae=False)
    for name, says in (("wider", "is Linear(24 -> "), ("deeper", "no layer 'blocks.7."),
                       ("builtin", "built-in model"), ("garbage", "not a readable safetensors"),
                       ("full", "not a LoRA")):  # fmt: skip
        with pytest.raises(FailedPrecondition) as e:
            probe.check_request(_job(wan, adapter=name))
        assert e.value.reason == "ADAPTER_MISMATCH" and says in str(e.value), (name, str(e.value))
    assert probe.adapter_infos() == []  # none of them is listed as usable
    assert not any(hasattr(m, "peft_config") for m in probe.experts.values())  # nothing was put in


def test_per_expert_folder_is_refused_by_a_one_expert_model(wan):
    loras = WanLoras(wan["adapters"], ("transformer",), {"transformer": wan["backend"].experts["high_noise"]})
    with pytest.raises(FailedPrecondition) as e:
        loras.get("fast")
    assert e.value.reason == "ADAPTER_MISMATCH" and "one expert" in str(e.value)
    assert set(loras.get("style").parts) == {"transformer"}  # a single file goes to its one transformer


def test_changed_file_is_read_again_and_the_cache_is_bounded(wan, tmp_path):
    ad = tmp_path / "adapters"
    # an expert of its own: LoRAs put into the shared backend's experts here would be its business
    model = WanBackend.load(wan["dir"], dtype=torch.bfloat16, experts=("high_noise",), vae=False).experts[
        "high_noise"
    ]
    for i in range(3):
        save_tiny_lora(ad / f"s{i}.safetensors", model, seed=10 + i)
    loras = WanLoras(ad, ("high_noise", "low_noise"), {"high_noise": model}, capacity=2)
    first = loras.get("s0")
    assert loras.get("s0") is first and loras.loads == 1  # cached while the file is unchanged
    path = ad / "s0.safetensors"
    save_tiny_lora(path, model, seed=99)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    second = loras.get("s0")
    assert loras.loads == 2 and second.version != first.version and second.key != first.key
    # in the expert: at most `capacity` LoRAs loaded, an older version of a file replaced
    try:
        loras.use("high_noise", first)
        loras.use("high_noise", second)
        assert set(model.peft_config) >= {second.key} and first.key not in model.peft_config
        for name in ("s1", "s2"):
            loras.use("high_noise", loras.get(name))
        ours = [k for k in model.peft_config if k.startswith("vmlora_")]
        assert len(ours) == 2 and second.key not in ours  # least recently used dropped
        assert len(loras._cache) == 2
    finally:
        loras.use("high_noise", None)


def test_model_info_lists_the_wan_adapters(wan):
    from services.denoiser.servicer import DenoiserServicer
    from videomesh.v1 import denoiser_pb2

    servicer = DenoiserServicer(wan["backend"])
    try:
        info = servicer.GetModelInfo(denoiser_pb2.GetModelInfoRequest(), None)
    finally:
        servicer.close()
    listed = {a.name: a for a in info.adapters}
    assert set(listed) == {"style", "fast", "acme/early"}
    assert listed["style"].description == "brand look" and listed["style"].rank == 4
    assert listed["fast"].parameters > 0 and len(listed["fast"].version) == 12


def test_ray_driver_refuses_adapters(wan):
    """The Ray executor's driver holds no experts (the shards apply only the built-in model's
    adapters): a Wan request with an adapter is FAILED_PRECONDITION there, and none is listed."""
    driver = WanBackend.load(
        wan["dir"], dtype=torch.bfloat16, experts=(), vae=False, adapters_dir=wan["adapters"]
    )
    with pytest.raises(FailedPrecondition) as e:
        driver.check_request(_job(wan, adapter="style"))
    assert e.value.reason == "ADAPTER_UNSUPPORTED" and "local executor" in str(e.value)
    driver.check_request(_job(wan))  # without an adapter it is served
    assert driver.adapter_infos() == []
