"""Do held-out-only words draw what their training synonyms draw? Same noise, same sentence,
one word swapped ("a large red block ..." vs "a large red box ..."), training-template
sentences (none of them is an evaluation prompt), judged by the detector.

    python scripts/experiments/synonym_check.py [ENCODER ...]

ENCODER: text-encoder weights (.safetensors) or a training checkpoint (.pt) with an "encoder"
entry; default: the shipped encoder ("shipped"). The denoiser is the shipped one. Prints, per sentence pair,
how many of 4 clips get the attribute right with the held-out word and with its synonym.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from services.denoiser.train import sample_clips
from services.denoiser.train_adapter import load_base
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from videomesh import weights
from videomesh.world import detect

# (attribute, expected value, sentence, held-out-only word, its training synonym): the pair of
# sentences differs in that word alone
CASES = [
    ("shape", "square", "a large red {} moves to the left on a black background", "block", "box"),
    ("shape", "square", "a small yellow {} falls on a gray background", "block", "box"),
    ("shape", "circle", "a large blue {} rises on a white background", "sphere", "ball"),
    ("shape", "circle", "a small orange {} moves right on a navy background", "orb", "ball"),
    ("color", "purple", "a large {} triangle moves down on a black background", "violet", "purple"),
    ("shape", "square", "灰色背景上一个红色的大{}向右移动", "方块", "盒子"),
    ("shape", "circle", "黑色背景上一个蓝色的小{}向左移动", "球体", "球"),
    ("color", "orange", "白色背景上一个{}的小圆形向下移动", "橘色", "橙色"),
    ("color", "orange", "灰色背景上一个{}的大正方形向上移动", "橘色", "橙色"),
    ("shape", "square", "灰色の背景で緑の小さい{}が右へ動く", "ブロック", "箱"),
    ("shape", "square", "白い背景で赤い大きい{}が下へ動く", "ブロック", "箱"),
    ("shape", "circle", "黒い背景で黄色い大きい{}が左へ動く", "球体", "ボール"),
]
PER_SENTENCE = 4


def main(paths: list[str]) -> None:
    torch.set_num_threads(2)
    model, shipped = load_base("default")
    for path in paths or ["shipped"]:
        enc = shipped
        if path != "shipped":
            enc = TextEncoder(TEXT_ENCODERS[model.cfg.encoder])
            if path.endswith(".pt"):
                enc.load_state_dict(torch.load(path, weights_only=False, map_location="cpu")["encoder"])
            else:
                weights.load_into(enc, path)
            enc.eval()
        texts = [
            s.format(w) for _, _, s, held, syn in CASES for w in (held, syn) for _ in range(PER_SENTENCE)
        ]
        frames = np.concatenate(
            [sample_clips(model, enc, texts[i : i + 48], seed=11) for i in range(0, len(texts), 48)]
        )
        rows = iter(frames)
        held = train = 0
        for attribute, expected, sentence, held_word, _ in CASES:
            a = sum(getattr(detect(next(rows)), attribute) == expected for _ in range(PER_SENTENCE))
            b = sum(getattr(detect(next(rows)), attribute) == expected for _ in range(PER_SENTENCE))
            held, train = held + a, train + b
            print(
                f"  {a}/{PER_SENTENCE} held-out word vs {b}/{PER_SENTENCE} training word   {sentence.format(held_word)}"
            )
        n = PER_SENTENCE * len(CASES)
        print(f"{path}: held-out words right {held} of {n}; their training synonyms {train} of {n}")


if __name__ == "__main__":
    main(sys.argv[1:])
