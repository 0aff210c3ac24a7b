"""Content-safety filtering of prompts, before anything reaches the encoder or a GPU.

Configurable term lists per category (public figures, violence, sexual content, …) in
English, Chinese and Japanese, matched against a folded form of the prompt that undoes the
usual evasions: Unicode NFKC (full-width letters, compatibility forms), case folding,
zero-width and other invisible characters, spacing or punctuation between letters
("t r u m p", "t.r.u.m.p"), common Latin/Cyrillic/Greek homoglyphs and digit-for-letter
swaps ("tr0mp"), and repeated letters ("truuump").
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTS = Path(__file__).with_name("safety_terms.toml")

# look-alikes folded to ASCII (after NFKC): Cyrillic, Greek, and digits/symbols used as letters
_HOMOGLYPHS = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ո": "n",
    "м": "m", "т": "t", "к": "k", "в": "b", "н": "h", "г": "r", "ꞵ": "b",
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "μ": "u", "ε": "e", "χ": "x", "υ": "u",
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s", "!": "i", "|": "l",
})  # fmt: skip
_INVISIBLE = {"Cf", "Cc", "Mn", "Me"}  # format (zero-width), control, combining marks


def fold(text: str) -> str:
    """A canonical form for matching: NFKC, casefold, no invisibles, accents off Latin letters, homoglyphs folded."""
    t = unicodedata.normalize("NFKC", text).casefold()
    out: list[str] = []
    for ch in unicodedata.normalize("NFKD", t):
        cat = unicodedata.category(ch)
        if cat in ("Cf", "Cc"):  # zero-width joiners, soft hyphens, bidi marks, controls
            continue
        if (
            cat in ("Mn", "Me") and out and out[-1].isascii()
        ):  # ü -> u, but keep kana voicing marks (プ stays プ)
            continue
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out)).translate(_HOMOGLYPHS)


def _words(folded: str) -> list[str]:
    """Words with repeats collapsed; runs of single characters ("t r u m p", "t.r.u.m.p") joined into one word."""
    out: list[str] = []
    run: list[str] = []
    for tok in re.findall(r"\w+", folded):
        if len(tok) == 1:
            run.append(tok)
            continue
        if run:
            out.append("".join(run))
            run = []
        out.append(tok)
    if run:
        out.append("".join(run))
    return [re.sub(r"(.)\1+", r"\1", w) for w in out]


def _is_cjk(term: str) -> bool:
    return any(ord(c) > 0x2E80 for c in term)


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    category: str = ""
    term: str = ""


class SafetyFilter:
    def __init__(self, lists: dict[str, list[str]]):
        self.terms: list[tuple[str, str, str]] = []  # (category, term, pattern)
        for cat, terms in lists.items():
            for t in terms:
                f = fold(t)
                if not f.strip():
                    continue
                if _is_cjk(f):
                    self.terms.append(
                        (cat, t, "".join(re.findall(r"\w", f)))
                    )  # CJK: no word boundaries, substring
                else:
                    self.terms.append((cat, t, " ".join(_words(f))))

    @classmethod
    def load(cls, path: Path | None = None) -> SafetyFilter:
        data = tomllib.loads(Path(path or DEFAULT_LISTS).read_text(encoding="utf-8"))
        return cls({cat: list(v.get("terms", [])) for cat, v in data.items()})

    def check(self, *texts: str) -> Verdict:
        for text in texts:
            folded = fold(text)
            words = " " + " ".join(_words(folded)) + " "
            letters = "".join(re.findall(r"\w", folded))
            # letters written one by one ("a n.a.k.e.d person"): a term anywhere inside such a run counts
            spelled = [
                re.sub(r"(.)\1+", r"\1", "".join(m.split())) for m in re.findall(r"(?:\b\w\b\W*){3,}", folded)
            ]
            spelled = ["".join(re.findall(r"\w", s)) for s in spelled]
            for cat, term, pattern in self.terms:
                if _is_cjk(pattern):
                    if pattern in letters:
                        return Verdict(True, cat, term)
                elif f" {pattern} " in words or any(pattern.replace(" ", "") in s for s in spelled):
                    return Verdict(True, cat, term)
        return Verdict(False)
