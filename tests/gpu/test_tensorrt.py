"""TensorRT engines built from the ONNX exports (videomesh/accel.py) against torch on CUDA.

Skipped cleanly without CUDA or without the tensorrt package. Tolerances: fp32 engines (TF32 may
be on in TensorRT's convolutions: ~1e-3 relative) within 5e-3 of torch fp32; fp16 engines within
5e-2 on the SR net's [0, 1] pixels; sampled frames within 2 uint8 levels on average.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
trt = pytest.importorskip("tensorrt")
pytest.importorskip("onnx")

from services.denoiser.model import MODELS, MoEDenoiser  # noqa: E402
from services.upscaler.model import SR_MODELS, ResidualESPCN  # noqa: E402
from videomesh.accel import (  # noqa: E402
    SR_DYNAMIC_AXES,
    UNET_DYNAMIC_AXES,
    UNET_INPUTS,
    TensorRTModule,
    accelerate,
    denoiser_example_inputs,
)
from videomesh.weights import load_into  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("trt")


@pytest.mark.parametrize("fp16", [False, True])
def test_sr_engine_matches_torch_at_several_frame_sizes(cache, fp16):
    net = ResidualESPCN(SR_MODELS["x8"]).eval()
    load_into(net, ROOT / "services/upscaler/weights/x8.safetensors")
    net = net.cuda()
    ranges = {"x": ((1, 3, 1, 1), (1, 3, 32, 32), (2, 3, 128, 128))}
    fast = accelerate(net, "tensorrt", (torch.rand(1, 3, 32, 32),), cache, name="sr-x8", input_names=["x"],
                      output_names=["y"], dynamic_axes=SR_DYNAMIC_AXES, shape_ranges=ranges, fp16=fp16)  # fmt: skip
    assert isinstance(fast, TensorRTModule)
    for shape in [(1, 3, 32, 32), (2, 3, 45, 80), (1, 3, 7, 5)]:
        x = torch.rand(*shape, device="cuda")
        with torch.inference_mode():
            ref, out = net(x), fast(x)
        assert out.device.type == "cuda" and out.shape == ref.shape
        assert _max_diff(out, ref) < (5e-2 if fp16 else 5e-3), shape
    # the engine is cached beside the ONNX file, keyed by GPU / TensorRT version / precision / profile
    assert fast.engine_path().exists()
    again = TensorRTModule(fast.onnx_path, shape_ranges=ranges, fp16=fp16)
    x = torch.rand(1, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        assert _max_diff(again(x), fast(x)) == 0.0
    # outside the profile: torch runs it
    big = torch.rand(1, 3, 130, 40, device="cuda")
    with torch.inference_mode():
        assert _max_diff(fast(big), net(big)) == 0.0


def test_unet_expert_engine_matches_torch(cache):
    model = MoEDenoiser(MODELS["default"]).eval()
    load_into(model, ROOT / "services/denoiser/weights/default.safetensors")
    unet = model.experts["low_noise"].cuda()
    cfg = model.cfg
    fast = accelerate(unet, "tensorrt", denoiser_example_inputs(cfg), cache, name="unet-default-low_noise",
                      input_names=UNET_INPUTS, output_names=["v"], dynamic_axes=UNET_DYNAMIC_AXES)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    for batch, text_len in [(2, 12), (4, 7), (1, 30)]:
        args = [a.cuda() for a in denoiser_example_inputs(cfg, batch=batch, text_len=text_len, generator=g)]
        with torch.inference_mode():
            ref, out = unet(*args), fast(*args)
        assert out.shape == ref.shape
        assert _max_diff(out, ref) < 5e-3 * max(1.0, float(ref.abs().max())), (batch, text_len)


def test_denoiser_on_tensorrt_samples_the_frames_torch_samples(cache):
    from services.denoiser.accel import accelerate_denoiser
    from services.denoiser.engine import DenoiseJob, DenoiserEngine, DenoiserSettings

    engine = DenoiserEngine(DenoiserSettings(device="cuda", precision="fp32"))
    engine.load()
    td = engine.cfg.unet.text_dim
    g = torch.Generator().manual_seed(3)
    job = DenoiseJob(torch.randn(1, 9, td, generator=g), torch.ones(1, 9, dtype=torch.bool),
                     torch.zeros(1, 1, td), torch.ones(1, 1, dtype=torch.bool),
                     engine.cfg.frames, engine.cfg.height, engine.cfg.width, 1, 8, 0.0)  # fmt: skip
    ref = engine.generate(job)
    accelerate_denoiser(engine.model, "tensorrt", cache, max_batch=4, max_text=64)
    out = engine.generate(job)
    assert not any(e.forward.fallbacks for e in engine.model.experts.values())
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 2.0


def test_upscaler_runtime_tensorrt(tmp_path):
    from services.upscaler.upscaler import SpatialUpscaler, UpscalerSettings

    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    outs = {}
    for runtime in ("torch", "tensorrt"):
        sp = SpatialUpscaler(
            UpscalerSettings(spatial="learned", device="cuda", runtime=runtime, accel_cache=tmp_path)
        )
        sp.load()
        outs[runtime] = sp(frame, 256, 256)
    # torch runs the SR net under fp16 autocast on CUDA, the engine with fp16 kernels
    assert np.abs(outs["tensorrt"].astype(int) - outs["torch"].astype(int)).mean() < 1.0
