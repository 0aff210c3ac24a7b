"""`videomesh train` / `make train`: reproduce the shipped default model from scratch.

1. Pretrain the text encoder on world captions (services/encoder/train.py).
2. Train one U-Net on all noise levels with the flow-matching loss (the shared phase).
3. Fork it into the two experts, as Wan2.2 forks Wan2.1: the high-noise expert fine-tunes on
   t >= boundary (layout and motion), the low-noise expert on t < boundary (detail).
4. The motion phase: the high-noise expert alone, t uniform on [boundary, 1], with a
   temporal-difference term. Logit-normal t (phases 2-3) almost never draws t > 0.95
   (P = 0.2%), yet the first sampling steps from pure noise are where a clip's layout over
   time, its motion, is decided: after phase 3 the model's x0 prediction at t = 1 was the
   same centred blob for every motion word (measured; MODEL_CARD.md).
5. The aligned phase: both experts (alternating) learn to use trajectory-aligned temporal
   layers (services/denoiser/model.py): each expert's motion head learns to classify the
   caption's motion (an auxiliary cross-entropy) while the denoising loss adapts the layers.
6. The detail phase: the low-noise expert alone (t < boundary), which draws the outline —
   it had only half of phases 3 and 5.

Data come from the procedural world (videomesh.world), rendered on the fly. Every
`eval_every` steps the EMA weights sample held-out prompts in each language and the
independent detector scores colour / shape / motion, so adherence is logged, not only the
loss. Checkpoints make the run resumable (a run may span sessions); the final EMA weights
are written as safetensors next to the services.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.denoiser.model import MODELS, MOTION_CLASSES, MoEDenoiser, count_parameters
from services.denoiser.sampling import cfg_velocity, flow_timesteps, sample_euler
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from services.encoder.train import TextTrainConfig, train_text_encoder
from videomesh import weights
from videomesh.world import (
    LANGS,
    VOCABULARIES,
    ClipSpec,
    caption,
    detect,
    heldout_prompts,
    render_clip,
    sample_spec,
    score,
)
from videomesh.world.styles import apply_style

log = logging.getLogger("videomesh.train")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TrainConfig:
    model: str = "default"
    seed: int = 0
    text: TextTrainConfig = field(default_factory=TextTrainConfig)
    steps: int = 3400  # denoiser optimiser steps of phases 2 and 3
    expert_fraction: float = 0.3  # the last 30% fine-tune the two experts separately
    batch: int = 16
    lr: float = 3e-4
    warmup: int = 200
    ema: float = 0.999
    # phase 4, after `steps`. Its in-process motion was flat over the last ~900 of 2,000 steps
    # (50/38/50% at 5,000 and 5,400); 1,200 leaves the budget for a longer phase 6.
    motion_steps: int = 1200
    motion_lr: float = 1e-4
    motion_td: float = 4.0  # weight of MSE(frame differences of x0-hat, of x0)
    align_steps: int = 1200  # phase 5, after the motion phase
    align_lr: float = 1e-4
    head_lr_scale: float = 10.0  # the motion heads (linear, on frozen text) learn at 10x align_lr
    align_aux: float = 1.0  # weight of the motion head's cross-entropy on the caption's motion
    align_ema: float = 0.99  # each expert's EMA updates every other step here
    # phase 6, after the aligned phase: the low-noise expert alone. On a GPU (in-process, 48
    # held-out prompts per language) its shape adherence kept rising with length: 600 -> 1000
    # -> 1500 -> 2000 steps gave English 75 -> 81 -> 81 -> 85% (MODEL_CARD.md).
    detail_steps: int = 2000
    detail_lr: float = 1e-4
    # which words training captions use, in every phase (the text encoder's too): "full" teaches
    # every word, uniformly (the shipped weights); "core" leaves out the held-out-only words (the
    # weights before, MODEL_CARD.md). Evaluation holds out templates either way; words in no
    # caption are measured apart (scripts/experiments/synonym_check.py, NOVEL).
    vocabulary: str = "full"
    cfg_dropout: float = 0.1
    texture_prob: float = 0.3
    eval_every: int = 1000  # ~0.7 min each on the CPU
    eval_per_lang: int = 8
    ckpt_every: int = 200
    out: Path = ROOT / "checkpoints" / "default"
    threads: int = 2
    # "cuda" trains the denoiser on a GPU (bf16 autocast there too). Data, timesteps and noise
    # are still drawn from the CPU generators, so a seed gives the same batches on either.
    device: str = "cpu"


# --- data ---------------------------------------------------------------------------------------


_MOTION_INDEX = {name: i for i, name in enumerate(MOTION_CLASSES)}


def batch(rng: np.random.Generator, cfg: TrainConfig, mcfg,
          style: str | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:  # fmt: skip
    """-> clips (B, T, 3, H, W) in [-1, 1], one caption per clip (random language) and the
    index into MOTION_CLASSES of the motion that caption asks for, (B,) ("still" for still
    clips and dropped captions: no trajectory). `style`: every clip in that brand look
    (videomesh/world/styles.py; the captions do not mention it)."""
    clips, texts, motions = [], [], []
    for _ in range(cfg.batch):
        spec = sample_spec(rng)
        frames = render_clip(spec, num_frames=mcfg.frames, height=mcfg.height, width=mcfg.width, rng=rng,
                             texture=bool(rng.random() < cfg.texture_prob))  # fmt: skip
        clips.append(apply_style(frames, style) if style else frames)
        if rng.random() < cfg.cfg_dropout:
            texts.append("")  # the unconditional branch of classifier-free guidance
            motions.append(_MOTION_INDEX["still"])
        else:
            texts.append(
                caption(spec, LANGS[rng.integers(len(LANGS))], rng, "train", vocabulary=cfg.vocabulary)
            )
            motions.append(_MOTION_INDEX.get(spec.motion, _MOTION_INDEX["still"]))
    x = (
        torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
    )  # (B, T, H, W, C) -> (B, T, C, H, W)
    return x, texts, torch.tensor(motions)


def sample_t(rng: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Logit-normal times (SD3), restricted to [lo, hi) by resampling."""
    out = torch.empty(0)
    while len(out) < n:
        t = torch.sigmoid(torch.randn(2 * n, generator=rng))
        out = torch.cat([out, t[(t >= lo) & (t < hi)]])
    return out[:n]


# --- evaluation ---------------------------------------------------------------------------------


def heldout_set(per_lang: int, seed: int) -> list[tuple[str, str, ClipSpec]]:
    """(language, prompt, spec) for the first `per_lang` held-out prompts of every language (the
    generator needs at least 8 to cover every colour)."""
    return [
        (lang, p, s)
        for lang in LANGS
        for p, s in heldout_prompts(lang, max(8, per_lang), seed=seed)[:per_lang]
    ]


@torch.no_grad()
def sample_clips(model: MoEDenoiser, encoder: TextEncoder, texts: list[str], *, steps: int = 20, seed: int = 123,
                 single_expert: bool = False) -> np.ndarray:  # fmt: skip
    """One clip per text with CFG (the model's per-expert guidance), in one batch, noise from
    `seed`: (N, T, H, W, 3) uint8."""
    mcfg = model.cfg
    dev = next(model.parameters()).device
    cond = tuple(v.to(dev) for v in encoder.encode(texts))
    uncond = tuple(v.to(dev) for v in encoder.encode([""] * len(texts)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(texts), mcfg.frames, mcfg.unet.channels, mcfg.height, mcfg.width), generator=g).to(
        dev
    )

    def net(xb, tb, text, mask):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return model(xb, tb, text, mask, expert="high_noise" if single_expert else None).float()

    velocity = cfg_velocity(net, cond, uncond, lambda t: model.guidance_for(model.expert_for(t)))
    out = sample_euler(velocity, x, flow_timesteps(steps, mcfg.shift))
    return ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


@torch.no_grad()
def evaluate(model: MoEDenoiser, encoder: TextEncoder, *, per_lang: int = 8, steps: int = 20, seed: int = 123,
             single_expert: bool = False) -> dict:  # fmt: skip
    """Sample held-out prompts in every language with CFG; score them with the detector.

    Before the fork only the shared weights (in the high-noise slot) are trained, so
    `single_expert` samples every step with them.
    """
    prompts = heldout_set(per_lang, seed)
    model.eval()
    frames = sample_clips(model, encoder, [p for _, p, _ in prompts], steps=steps, seed=seed,
                          single_expert=single_expert)  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for lang in LANGS:
        rows = [score(detect(f), s) for f, (lg, _, s) in zip(frames, prompts, strict=True) if lg == lang]
        table[lang] = {k: float(np.mean([r[k] for r in rows])) for k in ("color", "shape", "motion")}
    model.train()
    return table


# --- training -----------------------------------------------------------------------------------


def _cosine(peak: float, done: int, length: int) -> float:
    """Cosine decay from `peak` to a tenth of it over `length` steps (`done` of them taken)."""
    p = min(1.0, done / max(1, length))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _lr(cfg: TrainConfig, step: int) -> float:
    """Phases 2-3 warm up, then decay; phases 4, 5 and 6 each decay from their own peak."""
    align_at = cfg.steps + cfg.motion_steps
    detail_at = align_at + cfg.align_steps
    if step >= detail_at:
        return _cosine(cfg.detail_lr, step - detail_at, cfg.detail_steps)
    if step >= align_at:
        return _cosine(cfg.align_lr, step - align_at, cfg.align_steps)
    if step >= cfg.steps:
        return _cosine(cfg.motion_lr, step - cfg.steps, cfg.motion_steps)
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return _cosine(cfg.lr, step - cfg.warmup, cfg.steps - cfg.warmup)


def temporal_difference_loss(x0hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """MSE between the frame-to-frame changes of the implied clean clip and of the true one,
    (B, T, C, H, W) each: the same optimum as the flow loss (the posterior mean), more weight
    on the motion component."""
    return F.mse_loss(x0hat[:, 1:] - x0hat[:, :-1], x0[:, 1:] - x0[:, :-1])


def _optimizer(model: MoEDenoiser, cfg: TrainConfig, aligned: bool) -> torch.optim.Optimizer:
    """AdamW over the model; from the aligned phase on, the motion heads in a group of their own
    at `head_lr_scale` times the rate: a classifier must reach saturating logits (margins of
    ~5) from zero within the phase, which at the U-Net's rate it did not (cross-entropy 1.6 ->
    1.4 in its first 100 steps)."""
    if not aligned:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    heads = [p for n, p in model.named_parameters() if ".motion." in n]
    rest = [p for n, p in model.named_parameters() if ".motion." not in n]
    return torch.optim.AdamW([{"params": rest}, {"params": heads, "lr_scale": cfg.head_lr_scale}],
                             lr=cfg.align_lr, weight_decay=0.01)  # fmt: skip


def _with_new_params(saved: dict, model: MoEDenoiser, missing: list[str]) -> dict:
    """A single-group optimiser state saved before the parameters `missing` existed (checkpoints
    from before the motion heads) -> the same state for today's model: the saved slots move to
    their parameters' new positions, the new ones start empty (they get no gradient before the
    aligned phase, whose optimiser starts fresh)."""
    if not missing:
        return saved
    names = [n for n, _ in model.named_parameters()]
    old = [n for n in names if n not in set(missing)]
    if len(saved["param_groups"]) != 1 or len(saved["param_groups"][0]["params"]) != len(old):
        raise RuntimeError(f"optimiser state does not fit the model less {len(missing)} new parameters")
    where = {n: i for i, n in enumerate(names)}
    group = dict(saved["param_groups"][0], params=list(range(len(names))))
    return {"state": {where[old[k]]: v for k, v in saved["state"].items()}, "param_groups": [group]}


def _same_vocabulary(path: Path, saved: str | None, cfg: TrainConfig) -> None:
    """A run resumes only with the training words it started with."""
    if saved is not None and saved != cfg.vocabulary:
        raise ValueError(
            f"{path} was trained with vocabulary {saved!r}, not {cfg.vocabulary!r}: use another --out"
        )


def _save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(cfg: TrainConfig) -> dict:
    if cfg.vocabulary != cfg.text.vocabulary or cfg.vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {VOCABULARIES}, the same for the text encoder; "
                         f"got {cfg.vocabulary!r} and {cfg.text.vocabulary!r}")  # fmt: skip
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = MODELS[cfg.model]
    logf = open(out / "log.jsonl", "a")

    def record(**kw):
        logf.write(json.dumps(kw) + "\n")
        logf.flush()

    # a checkpoint of other training words is refused before any work (phase 1 included)
    ckpt = out / "ckpt.pt"
    st = torch.load(ckpt, weights_only=False, map_location=cfg.device) if ckpt.exists() else None
    if st is not None:
        saved = re.search(r"vocabulary='(\w+)'", st.get("config", ""))
        _same_vocabulary(ckpt, saved.group(1) if saved else "core", cfg)  # older checkpoints: core

    # 1. text encoder
    enc_path = out / "text_encoder.safetensors"
    encoder = TextEncoder(TEXT_ENCODERS[mcfg.encoder])
    if enc_path.exists():
        _same_vocabulary(enc_path, weights.metadata(enc_path).get("vocabulary"), cfg)  # older files: none
        weights.load_into(encoder, enc_path)
        log.info("text encoder: resumed from %s", enc_path)
    else:
        encoder, info = train_text_encoder(cfg.text)
        weights.save(encoder.state_dict(), enc_path, metadata={"vocabulary": cfg.vocabulary})
        record(phase="text", **info)
    encoder.eval().requires_grad_(False)

    # 2./3. denoiser
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = MoEDenoiser(mcfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = _optimizer(model, cfg, aligned=False)
    step, rng, trng, seconds = (
        0,
        np.random.default_rng(cfg.seed),
        torch.Generator().manual_seed(cfg.seed),
        0.0,
    )
    align_at = cfg.steps + cfg.motion_steps
    if st is not None:
        for m, key in ((model, "model"), (ema, "ema")):
            missing, unexpected = m.load_state_dict(st[key], strict=False)
            if unexpected or any(".motion." not in k for k in missing):
                raise RuntimeError(f"{ckpt} does not fit model {cfg.model}: {missing} {unexpected}")
        step, seconds = st["step"], st["seconds"]
        if step != align_at:  # the aligned phase starts with an optimiser of its own
            opt = _optimizer(model, cfg, aligned=step > align_at)
            opt.load_state_dict(_with_new_params(st["opt"], model, missing))
        rng.bit_generator.state = st["rng"]
        trng.set_state(st["trng"])
        log.info("resumed at step %d (%.0f s trained)", step, seconds)
    fork_at = int(cfg.steps * (1 - cfg.expert_fraction))
    detail_at = align_at + cfg.align_steps
    total = detail_at + cfg.detail_steps
    log.info("denoiser %s: %d params per expert; %d shared steps, %d expert steps, %d motion steps",
             cfg.model, count_parameters(model.experts["high_noise"]), fork_at, cfg.steps - fork_at,
             cfg.motion_steps)  # fmt: skip
    log.info("then %d aligned steps, %d detail steps", cfg.align_steps, cfg.detail_steps)
    t_start = time.perf_counter() - seconds
    losses: list[float] = []
    while step < total:
        if step == fork_at:  # both experts start from the shared weights (and so do their EMAs)
            model.experts["low_noise"].load_state_dict(model.experts["high_noise"].state_dict())
            ema.experts["low_noise"].load_state_dict(ema.experts["high_noise"].state_dict())
            log.info("step %d: forked into high-noise and low-noise experts", step)
        if step == align_at:
            opt = _optimizer(model, cfg, aligned=True)
            log.info("step %d: the aligned phase", step)
        x0, texts, motions = batch(rng, cfg, mcfg)
        states, mask = (v.to(dev) for v in encoder.encode(texts))
        x0, motions = x0.to(dev), motions.to(dev)
        aligned = step >= align_at
        if step >= detail_at or (aligned and step % 2 == 1):
            expert, t = "low_noise", sample_t(trng, cfg.batch, hi=mcfg.boundary)
        elif step >= cfg.steps:
            expert = "high_noise"
            t = mcfg.boundary + (1 - mcfg.boundary) * torch.rand(cfg.batch, generator=trng)
        elif step < fork_at:
            expert, t = "high_noise", sample_t(trng, cfg.batch)
        elif step % 2 == 0:
            expert, t = "high_noise", sample_t(trng, cfg.batch, lo=mcfg.boundary)
        else:
            expert, t = "low_noise", sample_t(trng, cfg.batch, hi=mcfg.boundary)
        noise = torch.randn(x0.shape, generator=trng).to(dev)
        t = t.to(dev)
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * noise
        for grp in opt.param_groups:
            grp["lr"] = _lr(cfg, step) * grp.get("lr_scale", 1.0)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            v = model.experts[expert](xt, t, states, mask).float()
        loss = F.mse_loss(v, noise - x0)
        if expert == "high_noise" and step >= cfg.steps and cfg.motion_td:
            loss = loss + cfg.motion_td * temporal_difference_loss(
                xt - tt * v, x0
            )  # x0-hat: the implied clip
        if aligned:
            net = model.experts[expert]
            loss = loss + cfg.align_aux * F.cross_entropy(net.motion_logits(net.pool(states, mask)), motions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            src = model.experts[expert]
            dst = ema.experts[expert]
            decay = min(
                cfg.align_ema if aligned else cfg.ema, (1 + step) / (10 + step)
            )  # warm-up: forget the init
            for pe, pm in zip(dst.parameters(), src.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        step += 1
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            el = time.perf_counter() - t_start
            log.info("step %d/%d loss %.4f lr %.2e  %.2fs/step  %.1f min", step, total, np.mean(losses[-50:]),
                     _lr(cfg, step), el / max(1, step), el / 60)  # fmt: skip
            record(step=step, loss=float(np.mean(losses[-50:])), minutes=el / 60)
        if step % cfg.eval_every == 0 or step in (cfg.steps, total):
            table = evaluate(ema, encoder, per_lang=cfg.eval_per_lang, single_expert=step <= fork_at)
            log.info("step %d held-out adherence: %s", step, json.dumps(table))
            record(step=step, eval=table)
        if step % cfg.ckpt_every == 0 or step in (cfg.steps, total):
            _save_ckpt(ckpt, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                              "seconds": time.perf_counter() - t_start, "rng": rng.bit_generator.state,
                              "trng": trng.get_state(), "config": repr(cfg)})  # fmt: skip
    minutes = (time.perf_counter() - t_start) / 60
    return {"minutes": minutes, "ema": ema, "encoder": encoder}


def export(ema: MoEDenoiser, encoder: TextEncoder, cfg: TrainConfig, meta: dict) -> tuple[Path, Path]:
    """Write the shipped weights (bf16 safetensors) next to the services."""
    mcfg = MODELS[cfg.model]
    den = ROOT / "services" / "denoiser" / "weights" / f"{mcfg.name}.safetensors"
    enc = ROOT / "services" / "encoder" / "weights" / f"{mcfg.encoder}.safetensors"
    enc_version = weights.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                for k, v in encoder.state_dict().items()}, enc, metadata={"model": mcfg.encoder})  # fmt: skip
    # the denoiser declares its encoder (engine.declared_encoder): the services may run on different machines
    weights.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ema.state_dict().items()}, den,
                 metadata={"model": mcfg.name, "encoder": f"{mcfg.encoder}@{enc_version}",
                           "train_config": json.dumps(asdict(cfg), default=str), **meta})  # fmt: skip
    return den, enc


def training_vocabulary(path: Path | None = None) -> str:
    """Which words the shipped default denoiser's training captions used ("core": no
    held-out-only word; "full": every word), from its weights' train_config metadata."""
    path = path or ROOT / "services" / "denoiser" / "weights" / "default.safetensors"
    config = json.loads(weights.metadata(path).get("train_config", "{}"))
    return config.get("vocabulary", "core")  # weights from before the option: core


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="videomesh train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--motion-steps", type=int, default=TrainConfig.motion_steps)
    p.add_argument("--align-steps", type=int, default=TrainConfig.align_steps)
    p.add_argument("--detail-steps", type=int, default=TrainConfig.detail_steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--text-steps", type=int, default=TextTrainConfig.steps)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--out", type=Path, default=TrainConfig.out)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocabulary", default=TrainConfig.vocabulary, choices=VOCABULARIES,
                   help="words in training captions: full (every word: the shipped weights) or core (held-out-only words left out)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, or cuda to train the denoiser on a GPU")
    p.add_argument(
        "--no-export", action="store_true", help="train (or resume) but do not overwrite the shipped weights"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", force=True)
    cfg = TrainConfig(model=a.model, steps=a.steps, motion_steps=a.motion_steps, align_steps=a.align_steps, detail_steps=a.detail_steps, batch=a.batch, eval_every=a.eval_every, out=a.out, seed=a.seed, device=a.device, vocabulary=a.vocabulary,
                      text=TextTrainConfig(model=MODELS[a.model].encoder, steps=a.text_steps, seed=a.seed, vocabulary=a.vocabulary))  # fmt: skip
    res = train(cfg)
    log.info("trained in %.1f minutes", res["minutes"])
    if not a.no_export:
        den, enc = export(res["ema"], res["encoder"], cfg, {"train_minutes": f"{res['minutes']:.1f}"})
        log.info("wrote %s and %s", den, enc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
