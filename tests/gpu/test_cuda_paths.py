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


def test_training_runs_on_cuda(tmp_path):
    """`videomesh train --device cuda`: every phase (shared, experts, motion, aligned, detail) on
    the GPU, the same batches as on the CPU (they are drawn from the CPU generators)."""
    from services.denoiser import train as tr
    from services.encoder.train import TextTrainConfig

    cfg = tr.TrainConfig(model="tiny", steps=4, motion_steps=2, align_steps=2, detail_steps=2, batch=2, warmup=1,
                         eval_every=10, eval_per_lang=1, ckpt_every=5, out=tmp_path / "ckpt", device="cuda",
                         text=TextTrainConfig(model="tiny", steps=3, batch=4))  # fmt: skip
    res = tr.train(cfg)
    assert next(res["ema"].parameters()).device.type == "cuda"
    st = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=False, map_location="cpu")
    assert st["step"] == 10 and all(
        torch.isfinite(v).all() for v in st["ema"].values() if v.is_floating_point()
    )
    assert st["ema"]["experts.low_noise.motion.bias"].any()  # the aligned phase ran


def test_xformers_attention_matches_the_matmul_path():
    """The xFormers kernel (long spatial sequences on CUDA) computes what plain matmuls do."""
    pytest.importorskip("xformers.ops")
    from services.denoiser import model as m

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(8, 256, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    try:
        assert m.set_attention("auto") == "xformers"
        fast = m._attend(q, k, v, heads=4)
        m.set_attention("matmul")
        ref = m._attend(q, k, v, heads=4)
    finally:
        m.set_attention("sdpa")
    assert (fast.float() - ref.float()).abs().max() < 1e-2


def test_tiny_wan_on_cuda_in_bf16_matches_the_cpu(tmp_path, caplog):
    """The Wan backend on CUDA (bf16 experts, fp32 VAE) against the same tiny model on the CPU.

    Tolerance: GPU and CPU bf16 kernels round differently (other GEMM tilings, fused attention),
    so frames are not bit-equal; over 4 steps of the tiny model they stay within a mean of 2 grey
    levels (the same bound as the default model's CUDA test above)."""
    import logging

    pytest.importorskip("diffusers")
    from services.denoiser.backends.base import DenoiseJob
    from services.denoiser.backends.loop import sample
    from services.denoiser.backends.wan import WanBackend
    from services.encoder.umt5 import UMT5TextEncoder
    from tests.wan_tiny import save_tiny_wan

    caplog.set_level(logging.INFO)
    d = save_tiny_wan(tmp_path / "a14b", "a14b")
    enc = UMT5TextEncoder.from_dir(d, dtype=torch.bfloat16).encode(["a red ball moving left", ""])
    job = DenoiseJob(enc.states[:1], enc.mask[:1], enc.states[1:], enc.mask[1:], frames=9, width=32, height=32,
                     seed=0, steps=4, guidance=5.0)  # fmt: skip
    cpu = sample(WanBackend.load(d, dtype=torch.bfloat16), job)
    gpu_backend = WanBackend.load(d, dtype=torch.bfloat16, device="cuda")
    gpu = sample(gpu_backend, job)
    # which attention kernel torch's SDPA picked on this GPU, for the record
    logging.getLogger("videomesh.gpu").info(
        "sdpa backends: flash=%s mem_efficient=%s math=%s", torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
    )  # fmt: skip
    assert gpu.shape == cpu.shape
    assert np.abs(gpu.astype(int) - cpu.astype(int)).mean() < 2.0
