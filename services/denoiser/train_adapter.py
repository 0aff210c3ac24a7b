"""`videomesh train-adapter` / `make train-adapter`: fit a brand style adapter (LoRA).

The shipped denoiser stays frozen; a low-rank delta on every Linear and convolution of both
experts (services/denoiser/lora.py) learns from world clips rendered in the brand look
(videomesh/world/styles.py: a magenta banner along the bottom) and captioned as usual — no
caption mentions the look — with the flow-matching loss, the high-noise and the low-noise
expert alternating on their own noise ranges (as in phase 3 of the base training).

Then it is measured: held-out prompts in every language sampled with and without the adapter
from the same noise, judged by the independent detector — how often the brand look appears,
and whether the prompt's colour, shape and motion survive it (judged above the banner).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.denoiser.engine import ADAPTERS_DIR, WEIGHTS_DIR
from services.denoiser.lora import Adapter, AdapterSlot, LoRAConfig, attach, detach
from services.denoiser.model import MODELS, MoEDenoiser
from services.denoiser.train import (
    TrainConfig,
    _cosine,
    batch,
    heldout_set,
    sample_clips,
    sample_t,
    training_vocabulary,
)
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from videomesh.weights import load_into
from videomesh.world import LANGS, detect, score
from videomesh.world.styles import STYLES, banner_share, without_banner

log = logging.getLogger("videomesh.train.adapter")
ENCODER_WEIGHTS = Path(__file__).resolve().parents[1] / "encoder" / "weights"


@dataclass(frozen=True)
class AdapterTrainConfig:
    name: str = "brand-banner"
    style: str = "banner"
    model: str = "default"
    rank: int = 4
    alpha: float = 4.0
    # which experts learn the look. The high-noise one lays a clip out (where things are, the
    # banner); the low-noise one draws outlines, and adapting it too cost shape (MODEL_CARD.md)
    experts: tuple[str, ...] = ("high_noise",)
    exclude: tuple[str, ...] = ()  # more layer names to leave alone (besides the motion heads)
    steps: int = 300
    batch: int = 8
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2


def load_base(model: str) -> tuple[MoEDenoiser, TextEncoder]:
    """The shipped denoiser (its weights' version in `.version`, the words its training
    captions used in `.vocabulary`) and text encoder."""
    mcfg = MODELS[model]
    torch.manual_seed(0)
    net = MoEDenoiser(mcfg)
    net.version = load_into(net, WEIGHTS_DIR / f"{mcfg.name}.safetensors")
    net.vocabulary = training_vocabulary(WEIGHTS_DIR / f"{mcfg.name}.safetensors")
    enc = TextEncoder(TEXT_ENCODERS[mcfg.encoder])
    enc.version = f"{mcfg.encoder}@{load_into(enc, ENCODER_WEIGHTS / f'{mcfg.encoder}.safetensors')}"
    return net.eval(), enc.eval().requires_grad_(False)


def train_adapter(cfg: AdapterTrainConfig, base: MoEDenoiser, encoder: TextEncoder) -> tuple[Adapter, dict]:
    """Train an adapter on `base` (left as it was on return)."""
    if cfg.style not in STYLES:
        raise ValueError(f"unknown style {cfg.style!r}; choose one of {', '.join(STYLES)}")
    torch.set_num_threads(cfg.threads)
    mcfg = base.cfg
    others = tuple(e for e in ("high_noise", "low_noise") if e not in cfg.experts)
    lcfg = LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, exclude=LoRAConfig().exclude + others + cfg.exclude)
    params = attach(base, lcfg, seed=cfg.seed)
    base.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng, trng = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    # the captions the base model was trained on (held-out-only words only if it was taught them)
    data = TrainConfig(model=mcfg.name, batch=cfg.batch, vocabulary=getattr(base, "vocabulary", "core"))
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        x0, texts, _ = batch(rng, data, mcfg, style=cfg.style)
        states, mask = encoder.encode(texts)
        expert = cfg.experts[step % len(cfg.experts)]
        if expert == "high_noise":
            t = sample_t(trng, cfg.batch, lo=mcfg.boundary)
        else:
            t = sample_t(trng, cfg.batch, hi=mcfg.boundary)
        noise = torch.randn(x0.shape, generator=trng)
        tt = t[:, None, None, None, None]
        for g in opt.param_groups:
            g["lr"] = _cosine(cfg.lr, step, cfg.steps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = base.experts[expert]((1 - tt) * x0 + tt * noise, t, states, mask).float()
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0:
            log.info("adapter step %d/%d loss %.4f  %.2fs/step", step + 1, cfg.steps, np.mean(losses[-25:]),
                     (time.perf_counter() - t0) / (step + 1))  # fmt: skip
    base.eval()
    desc = f"brand look '{cfg.style}': {STYLES[cfg.style]} (rank {cfg.rank}, {'+'.join(cfg.experts)}, {cfg.steps} steps)"
    adapter = detach(base, lcfg, name=cfg.name, base_model=mcfg.name, description=desc,
                     base_version=getattr(base, "version", ""), base_encoder=getattr(encoder, "version", ""))  # fmt: skip
    return adapter, {"minutes": (time.perf_counter() - t0) / 60, "final_loss": float(np.mean(losses[-25:]))}


@torch.no_grad()
def evaluate_adapter(base: MoEDenoiser, encoder: TextEncoder, adapter: Adapter, *, per_lang: int = 8,
                     seed: int = 123, strength: float = 1.0) -> dict:  # fmt: skip
    """Held-out prompts with and without the adapter, the same noise for both: the share of
    clips in the brand look (banner_share > 0.5) and colour / shape / motion judged above the
    banner, per language and overall."""
    prompts = heldout_set(per_lang, seed)
    texts = [p for _, p, _ in prompts]
    slot = AdapterSlot(base)
    out = {}
    for label, ad in (("base", None), ("adapter", adapter)):
        slot.use(ad, strength)
        frames = sample_clips(base, encoder, texts, seed=seed)
        rows = []
        for f, (lang, _, spec) in zip(frames, prompts, strict=True):
            r = score(detect(without_banner(f)), spec)
            rows.append({"lang": lang, "look": float(banner_share(f) > 0.5), **{k: float(r[k]) for k in ("color", "shape", "motion")}})  # fmt: skip
        keys = ("look", "color", "shape", "motion")
        table = {
            lang: {k: float(np.mean([r[k] for r in rows if r["lang"] == lang])) for k in keys}
            for lang in LANGS
        }
        table["all"] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        out[label] = table
    slot.use(None)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    d = AdapterTrainConfig()
    p = argparse.ArgumentParser(prog="videomesh train-adapter", description=__doc__.splitlines()[0])
    p.add_argument("--name", default=d.name, help="adapter name; 'tenant/name' makes it that tenant's own")
    p.add_argument("--style", default=d.style, choices=STYLES)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument(
        "--exclude", default="", help="layer names not to adapt, comma-separated (e.g. kv,text_proj)"
    )
    p.add_argument(
        "--experts", default=",".join(d.experts), help="high_noise, low_noise or both (comma-separated)"
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--eval-per-lang", type=int, default=8, help="held-out prompts per language (0 = no evaluation)"
    )
    p.add_argument("--out-dir", type=Path, default=ADAPTERS_DIR)
    a = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", force=True)
    experts = tuple(e for e in a.experts.split(",") if e)
    if not experts or any(e not in ("high_noise", "low_noise") for e in experts):
        p.error(f"--experts must name high_noise and/or low_noise; got {a.experts!r}")
    cfg = AdapterTrainConfig(name=a.name, style=a.style, steps=a.steps, rank=a.rank, lr=a.lr, seed=a.seed,
                             experts=experts, exclude=tuple(x for x in a.exclude.split(",") if x))  # fmt: skip
    base, encoder = load_base(cfg.model)
    adapter, info = train_adapter(cfg, base, encoder)
    path = a.out_dir / f"{adapter.name}.safetensors"
    adapter.save(path)
    log.info("wrote %s (%d parameters, %.1f min)", path, adapter.parameters(), info["minutes"])
    if a.eval_per_lang:
        table = evaluate_adapter(base, encoder, Adapter.load(path, adapter.name), per_lang=a.eval_per_lang)
        print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
