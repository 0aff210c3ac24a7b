"""Quiet per-step training times of each kind of denoiser step, and one adherence evaluation:
the rates behind the model card's from-scratch wall-time estimate.

    python scripts/experiments/phase_timing.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.denoiser.train import TrainConfig, batch, evaluate, sample_t

sys.path.insert(0, str(Path(__file__).parent))
from shape_sweep import load  # noqa: E402


def median_step(net, encoder, mcfg, rng, trng, n: int, hi: float) -> float:
    """Median seconds of n - 3 full training steps (data, text encoding, forward, backward, AdamW)."""
    cfg = TrainConfig()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        x0, texts, _motions = batch(rng, cfg, mcfg)
        states, mask = encoder.encode(texts)
        t = sample_t(trng, cfg.batch, hi=hi)
        noise = torch.randn(x0.shape, generator=trng)
        tt = t[:, None, None, None, None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = net((1 - tt) * x0 + tt * noise, t, states, mask).float()
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[3:]))


def main() -> None:
    torch.set_num_threads(2)
    model, encoder = load(torch.device("cpu"))
    mcfg = model.cfg
    rng, trng = np.random.default_rng(0), torch.Generator().manual_seed(0)
    low = model.experts["low_noise"].train()
    s = median_step(low, encoder, mcfg, rng, trng, 33, mcfg.boundary)
    print(f"step with trajectory shifts (phases 5-6): {s:.3f} s", flush=True)
    with torch.no_grad():  # an untrained head: plain temporal layers, as in phases 2-4
        low.motion.weight.zero_()
        low.motion.bias.zero_()
    s = median_step(low, encoder, mcfg, rng, trng, 33, 1.0)
    print(f"step with plain temporal layers (phases 2-4): {s:.3f} s", flush=True)
    fresh, _ = load(torch.device("cpu"))
    t0 = time.perf_counter()
    evaluate(fresh, encoder, per_lang=8)
    print(f"adherence evaluation (8 prompts per language): {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
