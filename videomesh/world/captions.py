"""Trilingual (English, Simplified Chinese, Japanese) captions for world clips.

A caption is a template filled with words chosen for a :class:`~videomesh.world.generator.ClipSpec`.
Colour, shape and motion are always stated; size and background may be left out of training captions
(the model must still learn from them), never out of :func:`heldout_prompts`.

Train / held-out split (fixed, so evaluation measures generalisation to unseen phrasings):

* Templates: about a quarter per language is held out — ``en-10..en-12`` ("show me a ...",
  "a ball in red ...", "..., you can see a ..."), ``zh-08..zh-09`` ("帮我生成一段视频：...",
  "...向右移动的是一个..."), ``ja-07..ja-08`` ("...右へ動くのは...", "...動画を作って").
  No training caption is ever built from them, so no held-out sentence appears in training.
* Words marked ``*`` in the lexicon below appear only in held-out captions (unless training
  asks for ``vocabulary="full"``: ``videomesh train --vocabulary full``), for example
  en: sphere, orb, block, violet, tiny, huge, glides, climbs, sinks, stays put, expands, contracts;
  zh: 球体, 方块, 橘色, 微小的, 巨大的, 向左平移, 纹丝不动, 不断膨胀, 海军蓝, 以…为背景;
  ja: 球体, ブロック, 橙色の, ちっちゃな, でっかい, 左へスライドする, 微動だにしない, 膨らんでいく,
  …一色の背景で. Held-out captions may also use every training word.

Lexicon markers: a leading ``*`` means held-out only; ``~`` means round shapes only ("rolls").
English motions are written ``present|gerund`` so one choice fills both verb slots.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .generator import BACKGROUNDS, COLORS, CORE_MOTIONS, SHAPES, SIZES, ClipSpec

LANGS: tuple[str, ...] = ("en", "zh", "ja")
SPLITS: tuple[str, ...] = ("train", "heldout")
# Which words training captions may use: "core" leaves out the held-out-only words (the recipe
# of the weights before), "full" draws from every word (the shipped model's recipe; the default
# of `videomesh train`). Held-out captions always use every word.
VOCABULARIES: tuple[str, ...] = ("core", "full")

# Probability that a training caption leaves out the size / the background.
_OMIT_SIZE = 0.2
_OMIT_BACKGROUND = 0.25


@dataclass(frozen=True)
class _Phrase:
    text: str
    heldout_only: bool = False
    round_only: bool = False

    def usable(self, split: str, shape: str, vocabulary: str = "core") -> bool:
        words_ok = split == "heldout" or vocabulary == "full" or not self.heldout_only
        return words_ok and (shape == "circle" or not self.round_only)


def _phrases(entries: Sequence[str]) -> tuple[_Phrase, ...]:
    out = []
    for entry in entries:
        markers = entry[: len(entry) - len(entry.lstrip("*~"))]
        out.append(_Phrase(entry[len(markers) :], heldout_only="*" in markers, round_only="~" in markers))
    return tuple(out)


@dataclass(frozen=True)
class _Template:
    id: str
    text: str  # {slot}s; a [segment] is dropped together with the size/background slot inside it
    heldout: bool = False


# ----------------------------------------------------------------------------------------- English


def _en_sideways(d: str, o: str) -> list[str]:
    return [
        f"moves to the {d}|moving to the {d}",
        f"moves {d}|moving {d}",
        f"slides to the {d}|sliding to the {d}",
        f"drifts {d}|drifting {d}",
        f"travels to the {d}|traveling to the {d}",
        f"heads {d}|heading {d}",
        f"moves from {o} to {d}|moving from {o} to {d}",
        f"goes {d}|going {d}",
        f"~rolls to the {d}|rolling to the {d}",
        f"*glides to the {d}|gliding to the {d}",
        f"*makes its way to the {d}|making its way to the {d}",
    ]


_EN = {
    "shape": {
        "circle": ["ball", "circle", "round dot", "dot", "*sphere", "*orb"],
        "square": ["square", "box", "cube", "*block"],
        "triangle": ["triangle"],
    },
    "color": {
        "red": ["red"],
        "orange": ["orange"],
        "yellow": ["yellow"],
        "green": ["green"],
        "cyan": ["cyan", "turquoise"],
        "blue": ["blue"],
        "purple": ["purple", "*violet"],
        "white": ["white"],
    },
    "size": {"small": ["small", "little", "*tiny"], "large": ["large", "big", "*huge"]},
    "motion": {
        "left": _en_sideways("left", "right"),
        "right": _en_sideways("right", "left"),
        "up": [
            "moves up|moving up",
            "moves upward|moving upward",
            "rises|rising",
            "floats up|floating up",
            "drifts upward|drifting upward",
            "moves from bottom to top|moving from bottom to top",
            "travels up|traveling up",
            "goes up|going up",
            "*climbs|climbing",
            "*glides upward|gliding upward",
        ],
        "down": [
            "moves down|moving down",
            "moves downward|moving downward",
            "falls|falling",
            "drops|dropping",
            "slides down|sliding down",
            "moves from top to bottom|moving from top to bottom",
            "travels down|traveling down",
            "goes down|going down",
            "*sinks|sinking",
            "*glides downward|gliding downward",
        ],
        "still": [
            "stays still|staying still",
            "does not move|not moving",
            "sits motionless|sitting motionless",
            "stays in place|staying in place",
            "remains stationary|remaining stationary",
            "*stays put|staying put",
            "*holds perfectly still|holding perfectly still",
        ],
        "grow": [
            "grows|growing",
            "gets bigger|getting bigger",
            "grows larger|growing larger",
            "becomes larger|becoming larger",
            "*expands|expanding",
            "*swells|swelling",
        ],
        "shrink": [
            "shrinks|shrinking",
            "gets smaller|getting smaller",
            "becomes smaller|becoming smaller",
            "grows smaller|growing smaller",
            "*contracts|contracting",
            "*dwindles|dwindling",
        ],
    },
    "bg_words": {
        "black": {"c": ["black"]},
        "white": {"c": ["white"]},
        "gray": {"c": ["gray", "grey"]},
        "navy": {"c": ["navy", "navy blue", "dark blue"]},
    },
    "bg": [
        "on a {c} background",
        "against a {c} background",
        "against {c}",
        "on {c}",
        "in front of a {c} backdrop",
        "*with a {c} background behind it",
    ],
    "bg_tag": ["{c} background", "{c} backdrop"],
    "bg_tail": ["The background is {c}.", "The backdrop is {c}.", "Background: {c}."],
}
_EN_TEMPLATES = [
    _Template("en-01", "a [{size} ]{color} {shape} {motion}[ {bg}]"),
    _Template("en-02", "[{bg}, ]a [{size} ]{color} {shape} {motion}"),
    _Template("en-03", "a [{size} ]{color} {shape} {motion_ing}[ {bg}]"),
    _Template("en-04", "the [{size} ]{color} {shape} {motion}[ {bg}]"),
    _Template("en-05", "[{size} ]{color} {shape}, {motion_ing}[, {bg_tag}]"),
    _Template("en-06", "a [{size} ]{color} {shape} {motion}.[ {bg_tail}]"),
    _Template("en-07", "video of a [{size} ]{color} {shape} {motion_ing}[ {bg}]"),
    _Template("en-08", "there is a [{size} ]{color} {shape}[ {bg}] that {motion}"),
    _Template("en-09", "a [{size} ]{color} {shape} that {motion}[ {bg}]"),
    _Template("en-10", "show me a [{size} ]{color} {shape} {motion_ing}[ {bg}]", heldout=True),
    _Template("en-11", "a [{size} ]{shape} in {color} {motion_ing}[ {bg}]", heldout=True),
    _Template("en-12", "[{bg}, ]you can see a [{size} ]{color} {shape} {motion_ing}", heldout=True),
]

# ----------------------------------------------------------------------------------------- Chinese


def _zh_sideways(d: str, o: str) -> list[str]:
    return [
        f"向{d}移动",
        f"往{d}移动",
        f"向{d}滑动",
        f"向{d}移",
        f"从{o}向{d}移动",
        f"朝{d}边移动",
        f"向{d}飘去",
        f"~向{d}滚动",
        f"*往{d}边走",
        f"*向{d}平移",
    ]


_ZH = {
    "shape": {
        "circle": ["球", "圆", "圆形", "圆球", "圆点", "*球体"],
        "square": ["正方形", "方形", "盒子", "*方块"],
        "triangle": ["三角形", "三角"],
    },
    "color": {
        "red": ["红色"],
        "orange": ["橙色", "*橘色"],
        "yellow": ["黄色"],
        "green": ["绿色"],
        "cyan": ["青色", "蓝绿色"],
        "blue": ["蓝色"],
        "purple": ["紫色"],
        "white": ["白色"],
    },
    # {size} prefixes the noun directly (小球, 大三角形); {size_adj} is a free-standing adjective.
    "size": {"small": ["小"], "large": ["大"]},
    "size_adj": {
        "small": ["小小的", "很小的", "小的", "*微小的"],
        "large": ["大大的", "很大的", "大的", "*巨大的"],
    },
    "motion": {
        "left": _zh_sideways("左", "右"),
        "right": _zh_sideways("右", "左"),
        "up": ["向上移动", "往上移动", "上升", "向上飘", "从下往上移动", "往上升", "*缓缓升起", "*向上平移"],
        "down": [
            "向下移动",
            "往下移动",
            "下落",
            "往下掉",
            "从上往下移动",
            "向下滑动",
            "*缓缓下沉",
            "*向下平移",
        ],
        "still": ["静止不动", "一动不动", "保持不动", "停在原地", "没有移动", "*纹丝不动", "*待着不动"],
        "grow": ["变大", "逐渐变大", "越来越大", "慢慢变大", "*不断膨胀", "*逐渐放大"],
        "shrink": ["变小", "逐渐变小", "越来越小", "慢慢缩小", "*不断收缩", "*逐渐缩小"],
    },
    # c: colour as a noun (黑色); s: the one-character form used in 黑底.
    "bg_words": {
        "black": {"c": ["黑色"], "s": ["黑"]},
        "white": {"c": ["白色"], "s": ["白"]},
        "gray": {"c": ["灰色"], "s": ["灰"]},
        "navy": {"c": ["深蓝色", "藏青色", "*海军蓝"], "s": ["深蓝", "藏青"]},
    },
    "bg": ["{c}背景上", "在{c}背景上", "{c}的背景上", "在{c}的背景中", "{s}底上", "*以{c}为背景"],
    "bgn": ["{c}背景", "{c}的背景", "{s}底"],
    "bg_tail": ["背景是{c}的", "{c}背景", "背景为{c}"],
}
_ZH_TEMPLATES = [
    _Template("zh-01", "[{bg}，]一个{color}的[{size}]{shape}{motion}"),
    _Template("zh-02", "[{bg}]有一个[{size_adj}]{color}{shape}{motion}"),
    _Template("zh-03", "{color}的[{size}]{shape}[在{bgn}上]{motion}"),
    _Template("zh-04", "一个[{size_adj}]{color}{shape}{motion}[，{bg_tail}]"),
    _Template("zh-05", "[{bgn}，]{color}[{size}]{shape}，{motion}"),
    _Template("zh-06", "[{bg}]一个{color}的[{size}]{shape}{motion}"),
    _Template("zh-07", "视频里，一个[{size_adj}]{color}{shape}[在{bgn}上]{motion}"),
    _Template("zh-08", "帮我生成一段视频：[{bg}，]一个{color}的[{size}]{shape}{motion}", heldout=True),
    _Template("zh-09", "[{bg}，]{motion}的是一个{color}的[{size}]{shape}", heldout=True),
]

# ---------------------------------------------------------------------------------------- Japanese


def _ja_sideways(d: str, o: str) -> list[str]:
    return [
        f"{d}へ動く",
        f"{d}に移動する",
        f"{d}へ滑っていく",
        f"{d}に進む",
        f"{o}から{d}へ動く",
        f"{d}へ流れていく",
        f"~{d}に転がる",
        f"*{d}の方へ進んでいく",
        f"*{d}へスライドする",
    ]


_JA = {
    "shape": {
        "circle": ["ボール", "円", "丸", "玉", "球", "*球体"],
        "square": ["四角", "正方形", "四角形", "箱", "*ブロック"],
        "triangle": ["三角形", "三角"],
    },
    # Attributive forms: they sit directly before the noun (赤いボール, 緑色の三角).
    "color": {
        "red": ["赤い", "赤色の"],
        "orange": ["オレンジ色の", "オレンジの", "*橙色の"],
        "yellow": ["黄色い", "黄色の"],
        "green": ["緑の", "緑色の"],
        "cyan": ["水色の", "シアンの"],
        "blue": ["青い", "青色の"],
        "purple": ["紫の", "紫色の"],
        "white": ["白い", "白色の"],
    },
    "size": {"small": ["小さな", "小さい", "*ちっちゃな"], "large": ["大きな", "大きい", "*でっかい"]},
    # Plain forms, which also work as relative clauses (右へ動くボール).
    "motion": {
        "left": _ja_sideways("左", "右"),
        "right": _ja_sideways("右", "左"),
        "up": [
            "上へ動く",
            "上に移動する",
            "上昇する",
            "浮かび上がる",
            "下から上へ動く",
            "上に進む",
            "*上の方へ昇っていく",
            "*上へスライドする",
        ],
        "down": [
            "下へ動く",
            "下に移動する",
            "落ちていく",
            "下降する",
            "上から下へ動く",
            "下に進む",
            "*下の方へ沈んでいく",
            "*下へスライドする",
        ],
        "still": [
            "静止している",
            "動かない",
            "じっとしている",
            "その場に止まっている",
            "止まったままでいる",
            "*ぴたりと止まっている",
            "*微動だにしない",
        ],
        "grow": [
            "大きくなる",
            "だんだん大きくなる",
            "拡大する",
            "徐々に大きくなる",
            "*膨らんでいく",
            "*膨張する",
        ],
        "shrink": [
            "小さくなる",
            "だんだん小さくなる",
            "縮小する",
            "徐々に小さくなる",
            "*しぼんでいく",
            "*縮んでいく",
        ],
    },
    "bg_words": {
        "black": {"adj": ["黒い"], "noun": ["黒"], "ground": ["黒地"]},
        "white": {"adj": ["白い"], "noun": ["白"], "ground": ["白地"]},
        "gray": {"adj": ["灰色の", "グレーの"], "noun": ["灰色", "グレー"], "ground": ["グレー地"]},
        "navy": {"adj": ["紺色の", "ネイビーの"], "noun": ["紺色", "ネイビー"], "ground": ["紺地"]},
    },
    "bg": [
        "{adj}背景で",
        "{adj}背景の上で",
        "{ground}に",
        "{noun}を背景に",
        "{noun}の背景で",
        "*{noun}一色の背景で",
    ],
    "bg_tail": ["背景は{noun}", "背景は{noun}です"],
}
_JA_TEMPLATES = [
    _Template("ja-01", "[{bg}、]{color}[{size}]{shape}が{motion}"),
    _Template("ja-02", "[{bg}][{size}]{color}{shape}が{motion}"),
    _Template("ja-03", "[{bg}]{motion}[{size}]{color}{shape}"),
    _Template("ja-04", "{color}[{size}]{shape}が{motion}。[{bg_tail}。]"),
    _Template("ja-05", "画面の中で[{size}]{color}{shape}が{motion}[。{bg_tail}]"),
    _Template("ja-06", "{color}[{size}]{shape}は[{bg}]{motion}"),
    _Template("ja-07", "[{bg}、]{motion}のは[{size}]{color}{shape}", heldout=True),
    _Template("ja-08", "[{bg}]{color}[{size}]{shape}が{motion}動画を作って", heldout=True),
]

# ------------------------------------------------------------------------------------------ tables

_SLOT = re.compile(r"\{(\w+)\}")
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
_WORD_SLOTS = ("shape", "color", "size", "size_adj", "motion")
_BG_SLOTS = ("bg", "bgn", "bg_tag", "bg_tail")


def _expand_background(patterns: Sequence[str], words: dict[str, list[str]]) -> list[str]:
    """Every pattern filled with every combination of the colour forms it names."""
    out = []
    for pattern in patterns:
        body = pattern.lstrip("*")
        names = _SLOT.findall(body)
        for combo in itertools.product(*(words[n] for n in names)):
            held = pattern.startswith("*") or any(w.startswith("*") for w in combo)
            filled = body.format(**{n: w.lstrip("*") for n, w in zip(names, combo, strict=True)})
            out.append(("*" if held else "") + filled)
    return out


def _build(lexicon: dict) -> dict[str, dict[str, tuple[_Phrase, ...]]]:
    table = {
        slot: {k: _phrases(v) for k, v in lexicon[slot].items()} for slot in _WORD_SLOTS if slot in lexicon
    }
    for slot in _BG_SLOTS:
        if slot in lexicon:
            table[slot] = {
                bg: _phrases(_expand_background(lexicon[slot], words))
                for bg, words in lexicon["bg_words"].items()
            }
    return table


_TABLES = {"en": _build(_EN), "zh": _build(_ZH), "ja": _build(_JA)}
_TEMPLATES: dict[str, list[_Template]] = {"en": _EN_TEMPLATES, "zh": _ZH_TEMPLATES, "ja": _JA_TEMPLATES}


def _check(lang: str) -> None:
    """Fail at import if a vocabulary value has no training phrase, so no spec is uncaptionable."""
    table = _TABLES[lang]
    for slot, values in table.items():
        for value, phrases in values.items():
            if not any(not p.heldout_only and not p.round_only for p in phrases):
                raise AssertionError(f"{lang}: {slot}={value} needs a training phrase usable for any shape")
    for slot, vocab in (("shape", SHAPES), ("color", COLORS), ("bg", BACKGROUNDS)):
        missing = set(vocab) - set(table[slot])
        if missing:
            raise AssertionError(f"{lang}: no {slot} words for {sorted(missing)}")


for _lang in LANGS:
    _check(_lang)


def template_ids(lang: str, split: str) -> tuple[str, ...]:
    """Ids of the templates that `split` draws from."""
    _validate(lang, split)
    return tuple(t.id for t in _TEMPLATES[lang] if t.heldout == (split == "heldout"))


@functools.cache
def heldout_only_words(lang: str, attribute: str | None = None) -> frozenset[str]:
    """Phrases that never occur in training captions (for tests and for reports); only those
    naming `attribute` ("color", "shape", "motion", …) when given."""
    tables = _TABLES[lang] if attribute is None else {attribute: _TABLES[lang][attribute]}
    return frozenset(
        p.text for values in tables.values() for ps in values.values() for p in ps if p.heldout_only
    )


def _validate(lang: str, split: str, vocabulary: str = "core") -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}; got {lang!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {VOCABULARIES}; got {vocabulary!r}")


def _choose(
    rng: np.random.Generator, phrases: Sequence[_Phrase], split: str, shape: str, vocabulary: str
) -> str:
    options = [p.text for p in phrases if p.usable(split, shape, vocabulary)]
    return options[rng.integers(len(options))]


def caption(
    spec: ClipSpec,
    lang: str,
    rng: np.random.Generator,
    split: str = "train",
    *,
    allow_omit: bool = True,
    vocabulary: str = "core",
) -> str:
    """One random natural-language description of `spec` from `split`'s templates and words.

    With `allow_omit`, size and background are sometimes left out; colour, shape and motion never
    are. `vocabulary` (training captions only): "core" leaves out the held-out-only words, "full"
    draws from every word, uniformly; the templates stay those of `split` either way.
    """
    _validate(lang, split, vocabulary)
    table = _TABLES[lang]
    templates = [t for t in _TEMPLATES[lang] if t.heldout == (split == "heldout")]
    template = templates[rng.integers(len(templates))]
    omit_size = allow_omit and rng.random() < _OMIT_SIZE
    omit_bg = allow_omit and rng.random() < _OMIT_BACKGROUND
    capitalise = rng.random() < 0.5

    # Draw every slot in a fixed order, so the random stream does not depend on the template.
    value = {
        "shape": spec.shape,
        "color": spec.color,
        "size": spec.size,
        "size_adj": spec.size,
        "motion": spec.motion,
    }
    slots = {
        s: _choose(rng, table[s][value[s]], split, spec.shape, vocabulary) for s in _WORD_SLOTS if s in table
    }
    slots.update(
        {
            s: _choose(rng, table[s][spec.background], split, spec.shape, vocabulary)
            for s in _BG_SLOTS
            if s in table
        }
    )
    present, _, gerund = slots["motion"].partition("|")
    slots["motion"], slots["motion_ing"] = present, gerund or present

    def keep(m: re.Match[str]) -> str:
        names = _SLOT.findall(m.group(1))
        dropped = any((n.startswith("size") and omit_size) or (n.startswith("bg") and omit_bg) for n in names)
        return "" if dropped else m.group(1)

    text = _SLOT.sub(lambda m: slots[m.group(1)], _OPTIONAL.sub(keep, template.text))
    if lang == "en":
        text = re.sub(r"\s+", " ", text).strip()
        text = re.sub(r"\b([aA]) (?=[aeiouAEIOU])", r"\1n ", text)  # a orange -> an orange
        if capitalise:
            text = text[0].upper() + text[1:]
    return text


def heldout_prompts(
    lang: str, n: int = 120, seed: int = 0, motions: Sequence[str] = CORE_MOTIONS
) -> list[tuple[str, ClipSpec]]:
    """A fixed evaluation set of `n` user-style prompts (held-out phrasings) with their true specs.

    Prompt i asks for colour i mod 8, shape i mod 3 and motion i mod len(motions), so any n >= 8
    covers every colour, shape and motion, and n = 120 (core motions) covers every combination.
    The specs depend on `seed` only, so the three languages are scored on the same clips. Every
    prompt states size and background, so the whole spec is determined by the text.
    """
    _validate(lang, "heldout")
    need = max(len(COLORS), len(SHAPES), len(motions))
    if n < need:
        raise ValueError(f"n must be >= {need} to cover every colour, shape and motion; got {n}")
    spec_rng = np.random.default_rng([seed, 0])
    text_rng = np.random.default_rng([seed, 1 + LANGS.index(lang)])
    out = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        backgrounds = [b for b in BACKGROUNDS if b != color]
        spec = ClipSpec(
            background=backgrounds[spec_rng.integers(len(backgrounds))],
            shape=SHAPES[i % len(SHAPES)],
            color=color,
            size=SIZES[spec_rng.integers(len(SIZES))],
            motion=motions[i % len(motions)],
        )
        out.append((caption(spec, lang, text_rng, "heldout", allow_omit=False), spec))
    return out


@functools.cache
def _world_words() -> tuple[tuple[str, frozenset[str], frozenset[str]], ...]:
    """(lang, shape phrases, colour phrases) for every language, held-out-only words included."""
    out = []
    for lang in LANGS:
        table = _TABLES[lang]
        shapes = frozenset(p.text for ps in table["shape"].values() for p in ps)
        colours = frozenset(p.text for ps in table["color"].values() for p in ps)
        out.append((lang, shapes, colours))
    return tuple(out)


def names_in_world(text: str) -> dict[str, set[str]]:
    """The shape and colour words of the generated world that `text` uses, in any of its languages:
    {"shape": {...}, "color": {...}}. English words match whole words (case-insensitive); Chinese
    and Japanese ones match as substrings (no spaces between words)."""
    folded = text.casefold()
    found: dict[str, set[str]] = {"shape": set(), "color": set()}
    for lang, shapes, colours in _world_words():
        for attribute, words in (("shape", shapes), ("color", colours)):
            for w in words:
                if re.search(rf"\b{re.escape(w)}\b", folded) if lang == "en" else w in text:
                    found[attribute].add(w)
    return found
