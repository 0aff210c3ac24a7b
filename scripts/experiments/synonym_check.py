"""Does a word draw what its core synonym draws? Same noise, same sentence, one word swapped
("a large red block ..." vs "a large red box ..."), training-template sentences (none of them
is an evaluation prompt), judged by the detector. Two tables:

* HELD: held-out-only words (videomesh/world/captions.py, `*`): in held-out captions only, unless
  the model was trained with `--vocabulary full`. The shipped (`full`) model: 47 of 48
  (synonyms 47); the `core` model before it: 28 of 48 (synonyms 48).
* NOVEL: words in no caption of either split, whatever the vocabulary ("globe", 朱红色, まる):
  what a model does with a word it was never taught. No target; it is what evaluation on
  held-out *phrasings* (templates) does not measure once every lexicon word is taught. Some
  share a character with a taught word (朱红色: 红), some share nothing (まる, ハコ).

    python scripts/experiments/synonym_check.py [ENCODER ...]

ENCODER: text-encoder weights (.safetensors) or a training checkpoint (.pt) with an "encoder"
entry; default: the shipped encoder ("shipped"). The denoiser is the shipped one. Prints, per
sentence pair, how many of 4 clips get the attribute right with the word and with its synonym.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import torch

from services.denoiser.train import sample_clips
from services.denoiser.train_adapter import load_base
from services.encoder.model import TEXT_ENCODERS, TextEncoder
from videomesh import weights
from videomesh.world import LANGS, caption, detect, sample_spec

# (attribute, expected value, sentence, probed word, its core synonym): the two sentences of a
# pair differ in that word alone
HELD = [
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
NOVEL = [
    ("shape", "circle", "a large blue {} moves to the left on a black background", "globe", "ball"),
    ("shape", "square", "a small yellow {} falls on a gray background", "crate", "box"),
    ("color", "red", "a large {} triangle moves up on a white background", "scarlet", "red"),
    ("color", "purple", "a small {} ball moves down on a black background", "lavender", "purple"),
    ("color", "red", "黑色背景上一个{}的小圆形向右移动", "朱红色", "红色"),
    ("color", "purple", "白色背景上一个{}的大正方形向下移动", "紫罗兰色", "紫色"),
    ("shape", "circle", "灰色背景上一个黄色的大{}向上移动", "圆盘", "圆形"),
    ("shape", "square", "黑色背景上一个绿色的小{}向左移动", "方盒", "方形"),
    ("color", "red", "黒い背景で{}小さい三角が右へ動く", "真っ赤な", "赤い"),
    ("shape", "circle", "白い背景で青い大きい{}が上へ動く", "まる", "丸"),
    ("shape", "square", "灰色の背景で黄色い小さい{}が左へ動く", "ハコ", "箱"),
    ("color", "purple", "黒い背景で{}大きい四角が下へ動く", "すみれ色の", "紫の"),
]
PER_SENTENCE = 4


def _in_some_caption(words: set[str], n: int = 3000) -> set[str]:
    """The words of `words` that some caption (any split, full vocabulary) contains."""
    rng = np.random.default_rng(0)
    found: set[str] = set()
    for _ in range(n):
        spec, lang = sample_spec(rng), LANGS[rng.integers(len(LANGS))]
        for split in ("train", "heldout"):
            text = caption(spec, lang, rng, split, vocabulary="full")
            found |= {w for w in words if (re.search(rf"\b{w}\b", text) if w.isascii() else w in text)}
    return found


def main(paths: list[str]) -> None:
    torch.set_num_threads(2)
    taught = _in_some_caption({row[3] for row in NOVEL})
    if taught:
        raise SystemExit(f"NOVEL words that captions do use: {sorted(taught)}")
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
        for name, cases in (("held-out-only words", HELD), ("novel words", NOVEL)):
            texts = [
                s.format(w) for _, _, s, word, syn in cases for w in (word, syn) for _ in range(PER_SENTENCE)
            ]
            frames = np.concatenate(
                [sample_clips(model, enc, texts[i : i + 48], seed=11) for i in range(0, len(texts), 48)]
            )
            rows = iter(frames)
            probed = core = 0
            for attribute, expected, sentence, word, _ in cases:
                a = sum(getattr(detect(next(rows)), attribute) == expected for _ in range(PER_SENTENCE))
                b = sum(getattr(detect(next(rows)), attribute) == expected for _ in range(PER_SENTENCE))
                probed, core = probed + a, core + b
                print(
                    f"  {a}/{PER_SENTENCE} word vs {b}/{PER_SENTENCE} core synonym   {sentence.format(word)}"
                )
            n = PER_SENTENCE * len(cases)
            print(f"{path}, {name}: right {probed} of {n}; their core synonyms {core} of {n}")


if __name__ == "__main__":
    main(sys.argv[1:])
