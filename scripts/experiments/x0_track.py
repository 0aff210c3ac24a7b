"""Probe: does the model's clean-clip prediction at high noise follow the motion word? (issue #3)

For each motion word, predicts x0 from pure noise at t = 0.99 and 0.9 (12 noises, conditional
only), averages the predictions and prints the red object's centroid every third frame. The
data's conditional mean travels ~16 px along the axis of motion; a model that has not learned
motion prints the same centred track for every word (MODEL_CARD.md, "Why motion did not come").
Run from the repo root: python scripts/experiments/x0_track.py [denoiser.safetensors]
"""

import sys

import torch

from services.denoiser.model import MODELS, MoEDenoiser
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from videomesh import weights

PROMPTS = {
    "right": "a large red ball moving right on a black background",
    "left": "a large red ball moving left on a black background",
    "up": "a large red ball moving up on a black background",
    "down": "a large red ball moving down on a black background",
    "still": "a large red ball staying still on a black background",
    "右 (zh)": "黑色背景上一个红色的大球向右移动",
}


def main(path: str = "services/denoiser/weights/default.safetensors", n: int = 12) -> None:
    torch.set_num_threads(2)
    cfg = MODELS["default"]
    enc = TextEncoder(TEXT_ENCODERS["default"])
    weights.load_into(enc, "services/encoder/weights/default.safetensors")
    model = MoEDenoiser(cfg)
    weights.load_into(model, path)
    enc.eval()
    model.eval()
    ys = torch.arange(cfg.height).float()[:, None]
    xs = torch.arange(cfg.width).float()[None]
    for t in (0.99, 0.9):
        print(f"t = {t}: centroid (x; y) of the mean x0 prediction, frames 0, 3, ..., 15")
        for word, prompt in PROMPTS.items():
            text, mask = enc.encode([prompt] * n)
            x = torch.randn(
                (n, cfg.frames, 3, cfg.height, cfg.width), generator=torch.Generator().manual_seed(2)
            )
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                v = model(x, torch.full((n,), t), text, mask).float()
            x0 = (x - t * v).mean(0)  # (T, C, H, W)
            red = (x0[:, 0] - 0.5 * (x0[:, 1] + x0[:, 2])).clamp(min=0)  # (T, H, W)
            mass = red.sum((-1, -2)) + 1e-6
            cx, cy = (red * xs).sum((-1, -2)) / mass, (red * ys).sum((-1, -2)) / mass
            print(
                f"  {word:8s} x {[round(float(c), 1) for c in cx[::3]]}  y {[round(float(c), 1) for c in cy[::3]]}"
            )


if __name__ == "__main__":
    main(*sys.argv[1:2])
