"""Which lever moves shape adherence? In-process, on held-out prompts, judged by the detector.

1. Sampler settings on the shipped weights (steps, shift, guidance per expert).
2. A longer detail phase: the shipped low-noise expert trains on (t < boundary) for
   --detail-steps more steps at a constant rate (EMA 0.999, the motion head's cross-entropy
   as in phase 6); its EMA is evaluated along the way with the default sampler.

Prints one JSON line per measurement (flushed), so a run cut short keeps what it measured.
Runs on CPU or CUDA (`--device cuda`; data and text encoding run in DataLoader workers).

    python scripts/experiments/shape_sweep.py --device cuda --per-lang 48 --detail-steps 4000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from services.denoiser.model import MODELS, MoEDenoiser
from services.denoiser.sampling import cfg_velocity, flow_timesteps, sample_euler
from services.denoiser.train import ROOT, TrainConfig, batch, heldout_set, sample_t
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from videomesh import weights
from videomesh.world import LANGS, detect, score


def load(device: torch.device, model: str = "default") -> tuple[MoEDenoiser, TextEncoder]:
    mcfg = MODELS[model]
    enc = TextEncoder(TEXT_ENCODERS[mcfg.encoder])
    weights.load_into(enc, ROOT / "services" / "encoder" / "weights" / f"{mcfg.encoder}.safetensors")
    den = MoEDenoiser(mcfg)
    weights.load_into(den, ROOT / "services" / "denoiser" / "weights" / f"{mcfg.name}.safetensors")
    return den.float().to(device).eval(), enc.eval().requires_grad_(False)


@torch.no_grad()
def evaluate(
    model: MoEDenoiser, encoder: TextEncoder, per_lang: int, seed: int = 123, chunk: int = 48, **sampler
):
    """-> (table per language, Counter of (true shape, size) -> misses). `sampler` overrides
    ModelConfig fields (shift, guidance_high, guidance_low, boundary) and `steps`."""
    steps = sampler.pop("steps", 20)
    cfg = dataclasses.replace(model.cfg, **sampler)
    dev = next(model.parameters()).device
    prompts = heldout_set(per_lang, seed)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), cfg.frames, cfg.unet.channels, cfg.height, cfg.width), generator=g)
    frames = []
    for i in range(0, len(prompts), chunk):
        texts = [p for _, p, _ in prompts[i : i + chunk]]
        cond = tuple(v.to(dev) for v in encoder.encode(texts))
        uncond = tuple(v.to(dev) for v in encoder.encode([""] * len(texts)))

        def net(xb, tb, text, mask):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return model(xb, tb, text, mask, expert=cfg.expert_for(float(tb[0]))).float()

        velocity = cfg_velocity(net, cond, uncond, lambda t: cfg.guidance_for(cfg.expert_for(t)))
        out = sample_euler(velocity, noise[i : i + chunk].to(dev), flow_timesteps(steps, cfg.shift))
        frames.append(
            ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
        )
    frames = np.concatenate(frames)
    table, misses = {}, Counter()
    for lang in LANGS:
        rows = []
        for f, (lg, _, spec) in zip(frames, prompts, strict=True):
            if lg != lang:
                continue
            r = score(detect(f), spec)
            rows.append(r)
            if not r["shape"]:
                misses[f"{spec.shape}/{spec.size}"] += 1
        table[lang] = {
            k: round(100 * float(np.mean([r[k] for r in rows])), 1) for k in ("color", "shape", "motion")
        }
    return table, dict(misses)


class Batches(torch.utils.data.IterableDataset):
    """Endless training batches (clips, text states, mask, motion class), rendered and encoded
    in the worker processes."""

    def __init__(self, encoder: TextEncoder, cfg: TrainConfig, mcfg, seed: int):
        self.encoder, self.cfg, self.mcfg, self.seed = encoder, cfg, mcfg, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            x0, texts, motions = batch(rng, self.cfg, self.mcfg)
            with torch.no_grad():
                states, mask = self.encoder.encode(texts)
            yield x0, states, mask, motions


def detail(model, encoder, args, dev, log):
    mcfg = model.cfg
    tcfg = TrainConfig(batch=args.batch)
    low = model.experts["low_noise"].train().requires_grad_(True)
    ema = copy.deepcopy(low).eval().requires_grad_(False)
    if args.start:  # e.g. the phase-5 checkpoint's low-noise expert: "model.*" and "ema.*" tensors
        from safetensors.torch import load_file

        st = load_file(args.start)
        for net, key in ((low, "model."), (ema, "ema.")):
            net.load_state_dict({k[len(key) :]: v.float() for k, v in st.items() if k.startswith(key)})
    opt = torch.optim.AdamW(low.parameters(), lr=args.lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(Batches(encoder, tcfg, mcfg, args.seed), batch_size=None,
                                         num_workers=args.workers, prefetch_factor=4 if args.workers else None)  # fmt: skip
    trng = torch.Generator().manual_seed(args.seed)
    checkpoints = {int(s) for s in args.eval_at.split(",")}
    total = max(checkpoints)
    t0, losses = time.perf_counter(), []
    for step, (x0, states, mask, motions) in enumerate(loader, start=1):
        if args.schedule == "cosine":  # as phase 6: from the peak to a tenth of it over the run
            for grp in opt.param_groups:
                grp["lr"] = args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / total)))
        x0, states, mask, motions = (v.to(dev, non_blocking=True) for v in (x0, states, mask, motions))
        if args.t_dist == "uniform":
            t = mcfg.boundary * torch.rand(args.batch, generator=trng)
        else:
            t = sample_t(trng, args.batch, hi=mcfg.boundary)
        noise = torch.randn(x0.shape, generator=trng).to(dev)
        t = t.to(dev)
        tt = t[:, None, None, None, None]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            v = low((1 - tt) * x0 + tt * noise, t, states, mask).float()
            logits = low.motion_logits(low.pool(states, mask)).float()
        loss = F.mse_loss(v, noise - x0) + F.cross_entropy(logits, motions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(low.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), low.parameters(), strict=True):
                pe.lerp_(pm, 1 - args.ema)
        losses.append(float(loss.detach()))
        if step in checkpoints:
            trained = model.experts["low_noise"]
            model.experts["low_noise"] = ema
            table, misses = evaluate(model, encoder, args.per_lang)
            model.experts["low_noise"] = trained
            log(arm="detail", step=step, batch=args.batch, lr=args.lr, schedule=args.schedule, ema=args.ema, t_dist=args.t_dist, loss=round(float(np.mean(losses[-100:])), 4),
                s_per_step=round((time.perf_counter() - t0) / step, 4), table=table, misses=misses)  # fmt: skip
        if step >= max(checkpoints):
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--per-lang", type=int, default=24)
    p.add_argument("--sampler", action="store_true", help="run the sampler grid first")
    p.add_argument("--eval-at", default="", help="detail steps at which to evaluate, e.g. 500,1000,2000")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.99, help="phase 6's EMA decay (align_ema)")
    p.add_argument("--t-dist", choices=("logit", "uniform"), default="logit", help="t below the boundary")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--start", default="", help="safetensors of the low-noise expert to start from")
    p.add_argument("--no-baseline", action="store_true", help="skip evaluating the shipped weights")
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)

    def log(**kw):
        print(json.dumps(kw, ensure_ascii=False), flush=True)

    model, encoder = load(dev)
    if not args.no_baseline:
        t0 = time.perf_counter()
        table, misses = evaluate(model, encoder, args.per_lang)
        log(arm="shipped", table=table, misses=misses, seconds=round(time.perf_counter() - t0, 1))
    if args.sampler:
        grid = [dict(steps=30), dict(steps=50), dict(shift=2.0), dict(shift=5.0), dict(guidance_high=3.0),
                dict(guidance_high=7.0), dict(guidance_low=1.5), dict(guidance_low=3.0), dict(boundary=0.8),
                dict(boundary=0.93)]  # fmt: skip
        for over in grid:
            table, misses = evaluate(model, encoder, args.per_lang, **over)
            log(arm="sampler", over=over, table=table, misses=misses)
    if args.eval_at:
        detail(model, encoder, args, dev, log)


if __name__ == "__main__":
    main()
