"""Pretraining of the text encoder on world captions, before the denoiser trains on it.

Why: trained only through the denoising loss, a from-scratch text encoder learns colour
(many pixels) long before motion (a few pixels' displacement per frame), and motion words
never separate — the prototypes in issue #3 stalled at chance on motion. Here the encoder
first learns, with small classification heads on its pooled state, to tell every attribute
a caption states (colour, shape, motion, size, background) in all three languages. The heads
are dropped afterwards; the denoiser then reads token states in which the motion words
already stand apart. It takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.encoder.model import TEXT_ENCODERS, TextEncoder, pooled
from videomesh.world import (
    BACKGROUNDS,
    COLORS,
    CORE_MOTIONS,
    LANGS,
    SHAPES,
    SIZES,
    caption,
    heldout_prompts,
    sample_spec,
)

log = logging.getLogger("videomesh.train.text")

ATTRS = {"color": COLORS, "shape": SHAPES, "motion": CORE_MOTIONS, "size": SIZES, "background": BACKGROUNDS}


@dataclass(frozen=True)
class TextTrainConfig:
    model: str = "default"
    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    omit_prob: float = 0.3  # share of captions that may leave out size/background (no label then)
    vocabulary: str = "full"  # which words training captions use (videomesh.world.VOCABULARIES)


class AttributeHeads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in ATTRS.items()})

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        p = pooled(states, mask)
        return {k: h(p) for k, h in self.heads.items()}


def caption_batch(
    rng: np.random.Generator, n: int, omit_prob: float, split: str = "train", *, vocabulary: str
):
    texts, labels, full = [], {k: [] for k in ATTRS}, []
    for _ in range(n):
        spec = sample_spec(rng)
        lang = LANGS[rng.integers(len(LANGS))]
        omit = rng.random() < omit_prob
        texts.append(caption(spec, lang, rng, split, allow_omit=omit, vocabulary=vocabulary))
        full.append(not omit)
        for k, vocab in ATTRS.items():
            labels[k].append(vocab.index(getattr(spec, k)))
    return texts, {k: torch.tensor(v) for k, v in labels.items()}, torch.tensor(full)


@torch.no_grad()
def heldout_accuracy(
    encoder: TextEncoder, heads: AttributeHeads, n: int = 120
) -> dict[str, dict[str, float]]:
    """Attribute read-out accuracy on the held-out phrasings, per language."""
    encoder.eval()
    out = {}
    for lang in LANGS:
        prompts = heldout_prompts(lang, n, seed=1)
        logits = heads(*encoder(**encoder.inputs([p for p, _ in prompts])))
        out[lang] = {
            k: float(
                (logits[k].argmax(-1) == torch.tensor([v.index(getattr(s, k)) for _, s in prompts]))
                .float()
                .mean()
            )
            for k, v in ATTRS.items()
        }
    encoder.train()
    return out


def train_text_encoder(cfg: TextTrainConfig, *, log_every: int = 250) -> tuple[TextEncoder, dict]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    enc = TextEncoder(TEXT_ENCODERS[cfg.model])
    heads = AttributeHeads(enc.cfg.dim)
    params = list(enc.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        texts, labels, full = caption_batch(rng, cfg.batch, cfg.omit_prob, vocabulary=cfg.vocabulary)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = heads(*enc(**enc.inputs(texts)))
        logits = {k: v.float() for k, v in logits.items()}
        loss = 0.0
        for k in ATTRS:
            ce = F.cross_entropy(logits[k], labels[k], reduction="none")
            if k in ("size", "background"):  # only where the caption is sure to state it
                ce = ce[full] if full.any() else ce[:0]
            loss = loss + (ce.mean() if len(ce) else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps:
            log.info(
                "text step %d/%d loss %.4f (%.0fs)",
                step,
                cfg.steps,
                float(loss.detach()),
                time.perf_counter() - t0,
            )
    acc = heldout_accuracy(enc, heads)
    log.info("text encoder held-out accuracy: %s", acc)
    return enc.eval(), {"heldout_accuracy": acc, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else TextTrainConfig.steps
    model = sys.argv[2] if len(sys.argv) > 2 else "default"
    _, info = train_text_encoder(TextTrainConfig(steps=steps, model=model))
    print(json.dumps(info, indent=1))
