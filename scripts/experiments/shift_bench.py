"""Trajectory shifts: the served matrix form against F.grid_sample, side by side in one run.

Times one clip's sampling (20 Euler steps with CFG, bf16 autocast, the shipped weights) and
one training step of the low-noise expert (batch 16) with each implementation, alternating
them, and prints the medians and the largest difference between the two clips.

    python scripts/experiments/shift_bench.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from services.denoiser import model as M
from services.denoiser.sampling import cfg_velocity, flow_timesteps, sample_euler


def grid_sample_shift(x: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """The previous implementation (fp32 grid_sample on a translation grid)."""
    if d is None:
        return x
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=torch.float32, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = d.float()
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(
        x.dtype
    )


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from shape_sweep import load

    torch.set_num_threads(2)
    den, enc = load(torch.device("cpu"))
    cond = enc.encode(["a small green triangle moving to the right on a gray background"])
    uncond = enc.encode([""])
    cfg = den.cfg

    def net(xb, tb, text, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return den(xb, tb, text, mask).float()

    def clip() -> torch.Tensor:
        x = torch.randn(
            (1, cfg.frames, cfg.unet.channels, cfg.height, cfg.width),
            generator=torch.Generator().manual_seed(0),
        )
        v = cfg_velocity(net, cond, uncond, lambda t: cfg.guidance_for(cfg.expert_for(t)))
        with torch.no_grad():
            return sample_euler(v, x, flow_timesteps(20, cfg.shift))

    low = den.experts["low_noise"].train().requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, cfg.frames, cfg.unet.channels, cfg.height, cfg.width, generator=g)
    states, mask = enc.encode(["a red ball moving left"] * 8 + ["蓝色的方块向上移动"] * 8)

    def step() -> None:
        t = torch.rand(16, generator=g) * cfg.boundary
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = low(x0 * (1 - t[:, None, None, None, None]), t, states, mask).float()
        v.square().mean().backward()

    impls = {"matrix (served)": M.shift_frames, "grid_sample (before)": grid_sample_shift}
    times = {k: {"clip": [], "train step": []} for k in impls}
    clips = {}
    for _ in range(4):
        for name, fn in impls.items():
            M.shift_frames = fn
            t0 = time.perf_counter()
            clips[name] = clip()
            times[name]["clip"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            step()
            times[name]["train step"].append(time.perf_counter() - t0)
    M.shift_frames = impls["matrix (served)"]
    for name, d in times.items():  # the first round warms up
        print(
            f"{name:<22} clip {statistics.median(d['clip'][1:]):.2f} s   train step {statistics.median(d['train step'][1:]):.2f} s"
        )
    a, b = clips.values()
    diff = (a - b).abs()
    print(
        f"difference between the two clips (values in [-1, 1]): mean {diff.mean().item():.4f}, largest {diff.max().item():.4f}"
    )


if __name__ == "__main__":
    main()
