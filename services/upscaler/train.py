"""Train the super-resolution network (`make train-upscaler`).

Data: frames of the procedural world (as the denoiser renders them) and patches of the
natural photographs that scikit-learn and scikit-image ship. The low-resolution side is
degraded like the denoiser's output — area downscaling, a slight blur and noise, mild
colour jitter — not only clean bicubic downscaling.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from services.upscaler.model import SR_MODELS, ResidualESPCN
from videomesh import weights
from videomesh.world import render_clip, sample_spec

log = logging.getLogger("videomesh.train.sr")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HELD_OUT_IMAGES = ("astronaut",)  # evaluation only


def natural_images(split: str = "train") -> list[np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    imgs = {"china": load_sample_images().images[0], "flower": load_sample_images().images[1]}
    for name in ("chelsea", "coffee", "rocket", "astronaut", "immunohistochemistry"):
        imgs[name] = getattr(data, name)()
    if split == "train":
        return [v for k, v in imgs.items() if k not in HELD_OUT_IMAGES]
    return [imgs[k] for k in HELD_OUT_IMAGES]


def degrade(hr: np.ndarray, scale: int, rng: np.random.Generator) -> np.ndarray:
    """HR uint8 -> LR uint8, the way the denoiser's frames look."""
    h, w = hr.shape[:2]
    lr = cv2.resize(hr, (w // scale, h // scale), interpolation=cv2.INTER_AREA).astype(np.float32)
    if rng.random() < 0.7:
        lr = cv2.GaussianBlur(lr, (0, 0), rng.uniform(0.3, 0.8))
    lr += rng.normal(0, rng.uniform(0, 4), lr.shape)
    return np.clip(lr, 0, 255).astype(np.uint8)


def world_pairs(rng, n: int, scale: int, hr: int = 128):
    out = []
    for _ in range(n):
        f = render_clip(
            sample_spec(rng), num_frames=2, height=hr, width=hr, rng=rng, texture=bool(rng.random() < 0.5)
        )[0]
        out.append((degrade(f, scale, rng), f))
    return out


def natural_pairs(rng, images, n: int, scale: int, hr: int = 128):
    out = []
    for _ in range(n):
        img = images[rng.integers(len(images))]
        y, x = rng.integers(0, img.shape[0] - hr), rng.integers(0, img.shape[1] - hr)
        f = np.ascontiguousarray(img[y : y + hr, x : x + hr])
        out.append((degrade(f, scale, rng), f))
    return out


def to_tensor(batch: list[np.ndarray]) -> torch.Tensor:
    return (
        torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
    )  # (N, H, W, C) -> (N, C, H, W)


def train(
    model_name: str = "x8", steps: int = 4000, batch: int = 16, lr: float = 2e-3, seed: int = 0, hr: int = 128
) -> ResidualESPCN:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = SR_MODELS[model_name]
    net = ResidualESPCN(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    images = natural_images("train")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        pairs = world_pairs(rng, batch // 2, cfg.scale, hr) + natural_pairs(
            rng, images, batch - batch // 2, cfg.scale, hr
        )
        x, y = to_tensor([p[0] for p in pairs]), to_tensor([p[1] for p in pairs])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        loss = F.l1_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.info(
                "sr step %d/%d L1 %.4f (%.0fs)", step, steps, float(loss.detach()), time.perf_counter() - t0
            )
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train-upscaler")
    p.add_argument("--model", default="x8")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", force=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    net = train(a.model, a.steps)
    path = WEIGHTS_DIR / f"{a.model}.safetensors"
    weights.save(net.state_dict(), path, metadata={"model": a.model, "steps": str(a.steps)})
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
