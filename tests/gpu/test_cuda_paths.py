"""CUDA paths, selected at run time; skipped cleanly where torch sees no CUDA device."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _job(cfg):
    from services.denoiser.engine import DenoiseJob

    g = torch.Generator().manual_seed(0)
    td = cfg.unet.text_dim
    return DenoiseJob(torch.randn(1, 6, td, generator=g), torch.ones(1, 6, dtype=torch.bool), torch.zeros(1, 1, td),
                      torch.ones(1, 1, dtype=torch.bool), cfg.frames, cfg.height, cfg.width, 1, 8, 0.0)  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_denoiser_on_cuda_matches_cpu(precision):
    from services.denoiser.engine import DenoiserEngine, DenoiserSettings

    cpu = DenoiserEngine(DenoiserSettings(device="cpu"))
    cpu.load()
    gpu = DenoiserEngine(DenoiserSettings(device="cuda", precision=precision))
    gpu.load()
    assert gpu.device.type == "cuda"
    a, b = cpu.generate(_job(cpu.cfg)), gpu.generate(_job(gpu.cfg))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_learned_sr_on_cuda():
    from services.upscaler.upscaler import SpatialUpscaler, UpscalerSettings

    sr = SpatialUpscaler(UpscalerSettings(spatial="learned", device="cuda"))
    sr.load()
    assert sr.device.type == "cuda"
    out = sr(np.zeros((90, 160, 3), np.uint8), 1280, 720)
    assert out.shape == (720, 1280, 3)
