# Run from the repo root: python scripts/experiments/motion_td_loss.py (about 10 min on 2 cores).
# Experiment: does a temporal-difference loss on x0-hat move motion adherence? (fine-tune the high-noise expert only)
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

torch.set_num_threads(2)
cfg = MODELS["default"]
enc = TextEncoder(TEXT_ENCODERS["default"])
weights.load_into(enc, "services/encoder/weights/default.safetensors")
enc.eval().requires_grad_(False)
m = MoEDenoiser(cfg)
weights.load_into(m, "services/denoiser/weights/default.safetensors")
ema = copy.deepcopy(m).requires_grad_(False)
net = m.experts["high_noise"]
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
tc = tr.TrainConfig(batch=16)
rng = np.random.default_rng(5)
g = torch.Generator().manual_seed(5)
t0 = time.time()
step = 0
while time.time() - t0 < 480:
    x0, texts = tr.batch(rng, tc, cfg)
    states, mask = enc.encode(texts)
    t = tr.sample_t(g, tc.batch, lo=0.7)
    noise = torch.randn(x0.shape, generator=g)
    tt = t[:, None, None, None, None]
    xt = (1 - tt) * x0 + tt * noise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = net(xt, t, states, mask).float()
    x0hat = xt - tt * v
    loss = F.mse_loss(v, noise - x0) + 4.0 * F.mse_loss(x0hat[:, 1:] - x0hat[:, :-1], x0[:, 1:] - x0[:, :-1])
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for pe, pm in zip(ema.experts["high_noise"].parameters(), net.parameters()):
            pe.lerp_(pm, 0.02)
    step += 1
print("steps", step, flush=True)
for name, model in (("before", MoEDenoiser(cfg)), ("after", ema)):
    if name == "before":
        weights.load_into(model, "services/denoiser/weights/default.safetensors")
    model.eval()
    tab = tr.evaluate(model, enc, per_lang=8, steps=20, seed=7)
    print(name, json.dumps({k: {a: round(b, 2) for a, b in v.items()} for k, v in tab.items()}), flush=True)
