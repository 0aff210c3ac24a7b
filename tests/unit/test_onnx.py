"""ONNX export of the small networks and onnxruntime (CPU) parity with torch (videomesh/accel.py).

Tolerances: fp32 throughout; onnxruntime's kernels sum in other orders than torch's, which moved
outputs by at most ~1e-5 here (U-Net outputs are O(10)), so forwards must agree within 1e-4 and
whole pipelines (uint8 frames) within one level.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from services.denoiser.model import MODELS, MoEDenoiser  # noqa: E402
from services.upscaler.model import SR_MODELS, ResidualESPCN  # noqa: E402
from videomesh.accel import (  # noqa: E402
    SR_DYNAMIC_AXES,
    UNET_DYNAMIC_AXES,
    UNET_INPUTS,
    OnnxModule,
    accelerate,
    check_runtime,
    denoiser_example_inputs,
)
from videomesh.weights import load_into  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("accel")


@pytest.fixture(scope="module")
def sr():
    net = ResidualESPCN(SR_MODELS["x8"]).eval()
    load_into(net, ROOT / "services/upscaler/weights/x8.safetensors")
    return net


@pytest.fixture(scope="module")
def denoiser():
    model = MoEDenoiser(MODELS["default"]).eval()
    load_into(model, ROOT / "services/denoiser/weights/default.safetensors")
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_sr_net_onnx_matches_torch_at_every_frame_size(sr, cache):
    fast = accelerate(sr, "onnx", (torch.rand(1, 3, 32, 32),), cache, name="sr-x8", input_names=["x"],
                      output_names=["y"], dynamic_axes=SR_DYNAMIC_AXES)  # fmt: skip
    assert isinstance(fast, OnnxModule)
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 32, 32), (1, 3, 18, 32), (2, 3, 45, 80), (1, 3, 7, 5)]:
        x = torch.rand(*shape, generator=g)
        with torch.inference_mode():
            ref, out = sr(x), fast(x)
        assert out.shape == ref.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
        assert _max_diff(out, ref) < TOL, shape


def test_unet_expert_onnx_matches_torch_for_any_batch_and_text_length(denoiser, cache):
    unet = denoiser.experts["low_noise"]
    assert unet.track(torch.zeros(1, 128), 16) is not None  # the trained motion head: aligned layers run
    cfg = denoiser.cfg
    fast = accelerate(unet, "onnx", denoiser_example_inputs(cfg), cache, name="unet-default-low_noise",
                      input_names=UNET_INPUTS, output_names=["v"], dynamic_axes=UNET_DYNAMIC_AXES)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    for batch, text_len in [(2, 12), (3, 7), (1, 30)]:
        args = denoiser_example_inputs(cfg, batch=batch, text_len=text_len, generator=g)
        with torch.inference_mode():
            ref, out = unet(*args), fast(*args)
        assert out.shape == ref.shape
        assert _max_diff(out, ref) < TOL, (batch, text_len)


def test_upscaler_with_runtime_onnx_gives_the_frames_torch_gives(cache):
    from services.upscaler.upscaler import SpatialUpscaler, UpscalePlan, UpscalerSettings, upscale_stream

    frames = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    plan = UpscalePlan(input_frames=3, input_fps=4.0, width=256, height=256, output_frames=5, output_fps=8.0)
    outs = {}
    for runtime in ("torch", "onnx"):
        sp = SpatialUpscaler(
            UpscalerSettings(spatial="learned", device="cpu", runtime=runtime, accel_cache=cache)
        )
        sp.load()
        assert runtime in sp.name or runtime == "torch"
        outs[runtime] = np.stack(list(upscale_stream(plan, iter(frames), sp)))
    assert outs["onnx"].shape == (5, 256, 256, 3)
    assert np.abs(outs["onnx"].astype(int) - outs["torch"].astype(int)).max() <= 1


def test_denoiser_experts_on_onnx_sample_the_frames_torch_samples(denoiser, cache):
    from services.denoiser.accel import AcceleratedForward, accelerate_denoiser, restore_denoiser
    from services.denoiser.engine import DenoiseJob, DenoiserEngine, DenoiserSettings

    engine = DenoiserEngine(DenoiserSettings(device="cpu", precision="fp32"))
    engine.load()
    td = engine.cfg.unet.text_dim
    g = torch.Generator().manual_seed(3)
    job = DenoiseJob(torch.randn(1, 9, td, generator=g), torch.ones(1, 9, dtype=torch.bool),
                     torch.zeros(1, 1, td), torch.ones(1, 1, dtype=torch.bool),
                     engine.cfg.frames, engine.cfg.height, engine.cfg.width, 1, 4, 0.0)  # fmt: skip
    ref = engine.generate(job)
    accelerate_denoiser(engine.model, "onnx", cache)
    fwd = {k: e.forward for k, e in engine.model.experts.items()}
    assert all(isinstance(f, AcceleratedForward) for f in fwd.values())
    out = engine.generate(job)
    assert out.shape == ref.shape
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    assert not any(f.fallbacks for f in fwd.values())  # every step ran on onnxruntime
    # the backend's call, expert named
    args = denoiser_example_inputs(engine.cfg, batch=2, text_len=5)
    with torch.inference_mode():
        v = engine.model(*args, expert="high_noise")
    restore_denoiser(engine.model)
    with torch.inference_mode():
        assert _max_diff(v, engine.model(*args, expert="high_noise")) < TOL


def test_changed_weights_fall_back_to_torch_until_restored(denoiser, cache):
    """A style adapter merges into the weights in place; the exported graph holds the base weights."""
    from services.denoiser.accel import accelerate_denoiser, restore_denoiser

    accelerate_denoiser(denoiser, "onnx", cache)
    try:
        fwd = denoiser.experts["low_noise"].forward
        args = denoiser_example_inputs(denoiser.cfg, batch=2, text_len=6)
        w = denoiser.experts["low_noise"].stem.weight
        saved = w.detach().clone()
        with torch.inference_mode():
            base = denoiser(*args, expert="low_noise")
            with torch.no_grad():
                w.add_(0.05)
            changed = denoiser(*args, expert="low_noise")
            assert fwd.fallbacks == 1
            assert _max_diff(changed, fwd.torch_forward(*args)) == 0.0  # torch, with the changed weights
            assert _max_diff(changed, base) > 1e-3
            with torch.no_grad():
                w.copy_(saved)
            again = denoiser(*args, expert="low_noise")
        assert fwd.fallbacks == 1 and _max_diff(again, base) == 0.0  # back on onnxruntime
    finally:
        restore_denoiser(denoiser)


def test_unavailable_runtimes_are_named():
    from services.upscaler.upscaler import UpscalerSettings

    with pytest.raises(ValueError, match="runtime must be one of torch, onnx, tensorrt, compile"):
        UpscalerSettings(runtime="openvino").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="runtime=tensorrt needs CUDA and the tensorrt package"):
            check_runtime("tensorrt")
    check_runtime("onnx")
    UpscalerSettings(runtime="onnx").validate()


@pytest.mark.slow
def test_torch_compile_runtime_matches_torch(sr):
    """torch.compile (~tens of seconds to compile on this CPU): same outputs as eager."""
    from videomesh.accel import unavailable

    if unavailable("compile"):
        pytest.skip(unavailable("compile"))
    fast = accelerate(sr, "compile", (torch.rand(1, 3, 16, 16),))
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        assert _max_diff(fast(x), sr(x)) < TOL
