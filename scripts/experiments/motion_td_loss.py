"""Probe: does a temporal-difference loss move motion adherence? (issue #3; not in the shipped weights)

Fine-tunes only the high-noise expert of the shipped default model for 8 minutes on t >= 0.7
with MSE(v) + 4 * MSE(frame differences of x0-hat vs of x0), then compares held-out adherence
before and after (in-process, 8 prompts per language). Run from the repo root:
python scripts/experiments/motion_td_loss.py   (about 10 minutes on 2 cores)
"""

import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from services.denoiser import train as tr
from services.denoiser.model import MODELS, MoEDenoiser
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from videomesh import weights

DENOISER = "services/denoiser/weights/default.safetensors"
ENCODER = "services/encoder/weights/default.safetensors"


def main(seconds: float = 480.0) -> None:
    torch.set_num_threads(2)
    cfg = MODELS["default"]
    enc = TextEncoder(TEXT_ENCODERS["default"])
    weights.load_into(enc, ENCODER)
    enc.eval().requires_grad_(False)
    model = MoEDenoiser(cfg)
    weights.load_into(model, DENOISER)
    ema = copy.deepcopy(model).requires_grad_(False)
    net = model.experts["high_noise"]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    tc = tr.TrainConfig(batch=16)
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(5)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        x0, texts, _ = tr.batch(rng, tc, cfg)
        states, mask = enc.encode(texts)
        t = tr.sample_t(gen, tc.batch, lo=0.7)
        noise = torch.randn(x0.shape, generator=gen)
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * noise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = net(xt, t, states, mask).float()
        x0hat = xt - tt * v  # (B, T, C, H, W): the clean clip the model implies
        loss = F.mse_loss(v, noise - x0) + 4.0 * tr.temporal_difference_loss(x0hat, x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.experts["high_noise"].parameters(), net.parameters(), strict=True):
                pe.lerp_(pm, 0.02)
        step += 1
    print("steps", step, flush=True)
    before = MoEDenoiser(cfg)
    weights.load_into(before, DENOISER)
    for name, m in (("before", before), ("after", ema)):
        table = tr.evaluate(m.eval(), enc, per_lang=8, steps=20, seed=7)
        print(
            name,
            json.dumps({k: {a: round(b, 2) for a, b in v.items()} for k, v in table.items()}),
            flush=True,
        )


if __name__ == "__main__":
    main()
