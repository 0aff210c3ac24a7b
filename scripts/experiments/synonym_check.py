"""Do held-out-only words draw what their training synonyms draw? Same noise, same sentence,
one word swapped ("a large red block ..." vs "a large red box ..."), training-template
sentences (none of them is an evaluation prompt), judged by the detector.

    python scripts/experiments/synonym_check.py [ENCODER ...]

ENCODER: text-encoder weights (.safetensors) or a training checkpoint (.pt) with an "encoder"
entry; default: the shipped encoder. The denoiser is the shipped one. Prints, per sentence pair,
how many of 4 clips get the attribute right with the held-out word and with its synonym.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from services.denoiser.model import MODELS, MoEDenoiser
from services.denoiser.train import ROOT, sample_clips
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from videomesh import weights
from videomesh.world import detect

# (attribute, expected value, sentence with a held-out-only word, the same with a training word)
CASES = [
    ("shape", "square", "a large red block moves to the left on a black background", "a large red box moves to the left on a black background"),
    ("shape", "square", "a small yellow block falls on a gray background", "a small yellow box falls on a gray background"),
    ("shape", "circle", "a large blue sphere rises on a white background", "a large blue ball rises on a white background"),
    ("shape", "circle", "a small orange orb moves right on a navy background", "a small orange ball moves right on a navy background"),
    ("color", "purple", "a large violet triangle moves down on a black background", "a large purple triangle moves down on a black background"),
    ("shape", "square", "灰色背景上一个红色的大方块向右移动", "灰色背景上一个红色的大盒子向右移动"),
    ("shape", "circle", "黑色背景上一个蓝色的小球体向左移动", "黑色背景上一个蓝色的小球向左移动"),
    ("color", "orange", "白色背景上一个橘色的小圆形向下移动", "白色背景上一个橙色的小圆形向下移动"),
    ("color", "orange", "灰色背景上一个橘色的大正方形向上移动", "灰色背景上一个橙色的大正方形向上移动"),
    ("shape", "square", "灰色の背景で緑の小さいブロックが右へ動く", "灰色の背景で緑の小さい箱が右へ動く"),
    ("shape", "square", "白い背景で赤い大きいブロックが下へ動く", "白い背景で赤い大きい箱が下へ動く"),
    ("shape", "circle", "黒い背景で黄色い大きい球体が左へ動く", "黒い背景で黄色い大きいボールが左へ動く"),
]  # fmt: skip
PER_SENTENCE = 4


def main(paths: list[str]) -> None:
    torch.set_num_threads(2)
    mcfg = MODELS["default"]
    model = MoEDenoiser(mcfg)
    weights.load_into(model, ROOT / "services" / "denoiser" / "weights" / f"{mcfg.name}.safetensors")
    model.eval()
    for path in paths or [str(ROOT / "services" / "encoder" / "weights" / f"{mcfg.encoder}.safetensors")]:
        enc = TextEncoder(TEXT_ENCODERS[mcfg.encoder])
        if path.endswith(".pt"):
            enc.load_state_dict(torch.load(path, weights_only=False, map_location="cpu")["encoder"])
        else:
            weights.load_into(enc, path)
        enc.eval()
        texts = [t for c in CASES for t in (c[2], c[3]) for _ in range(PER_SENTENCE)]
        frames = np.concatenate(
            [sample_clips(model, enc, texts[i : i + 48], seed=11) for i in range(0, len(texts), 48)]
        )
        rows = iter(frames)
        held = train = 0
        for attribute, expected, held_text, _train_text in CASES:
            a = sum(getattr(detect(next(rows)), attribute) == expected for _ in range(PER_SENTENCE))
            b = sum(getattr(detect(next(rows)), attribute) == expected for _ in range(PER_SENTENCE))
            held, train = held + a, train + b
            print(f"  {a}/{PER_SENTENCE} held-out word vs {b}/{PER_SENTENCE} training word   {held_text}")
        n = PER_SENTENCE * len(CASES)
        print(f"{path}: held-out words right {held} of {n}; their training synonyms {train} of {n}")


if __name__ == "__main__":
    main(sys.argv[1:])
