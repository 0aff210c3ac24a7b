"""Content-safety filtering of prompts, before anything reaches the encoder or a GPU.

Configurable term lists per category (public figures, violence, sexual content, …) in
English, Chinese and Japanese (`safety_terms.toml`), matched against a folded form of the
prompt that undoes the usual evasions:

* Unicode NFKC (full-width letters, half-width katakana, compatibility forms), case folding,
  zero-width and other invisible characters, accents on Latin letters ("trümp");
* look-alike letters from the Unicode confusables data (the `confusable-homoglyphs` package:
  Cyrillic "тrump", Greek, Armenian "trսmp" / "օbama", Cherokee…) and Latin small capitals
  ("ᴛʀᴜᴍᴘ", by their Unicode names); a short hand map remains only for digit-for-letter
  leetspeak ("p0rn"), and a digit inside a word also stands for any one letter of a listed
  word of four letters or more ("tr0mp" is "trump"; at most one character in three, and three
  real letters), so a wrong guess at the digit does not help;
* traditional Chinese characters folded to simplified ones (OpenCC's tables, the
  `opencc-python-reimplemented` package): "馬斯克" and "裸體" match "马斯克" and "裸体". A
  different transliteration of a name ("歐巴馬", Taiwan's Obama, not "奧巴馬") is another
  word, so the list names it;
* pinyin: every all-Han term is also matched as its toneless pinyin (`pypinyin`, at load
  time), spaced or joined ("te lang pu", "telangpu", "Chuan-Pu");
* separators: Latin words are compared as a run of letters across word boundaries, so
  "t r u m p", "t_r_u_m_p", "t.r.u.m.p" and "tr ump" all match "trump", but only whole
  words do: "a trumpet", "grumpy cat" pass. CJK terms are matched on the CJK characters alone,
  so "特_朗_普" and "特 朗 普" match; repeated letters ("truuump") are collapsed.

Ambiguous words. A plain term counts wherever it occurs. An entry of a category's
`[[CATEGORY.ambiguous]]` list counts too, except where the occurrence lies inside one of
its `unless_part_of` phrases, the harmless words that contain it: トランプ (Trump, but also
playing cards) is excused in "トランプで遊ぶ", "トランプをする", "トランプのカード"…, and
still blocks in "トランプが踊る", "トランプ大統領", "make トランプ dance"; エロ is excused in
"エロンゲーション", "イエロー"; "putin" is excused as the phrase "put in" (but "pu tin" and
"p u t i n" block). Each occurrence is judged on its own, so "トランプ大統領がトランプで遊ぶ"
blocks. A word whose usual sense is harmless is not listed alone at all: マスク is a face mask
(マスクをした女性), so the list names Musk's qualified forms (イーロン・マスク, マスク氏); a
bare "マスクが踊る" passes. We chose phrase lists over word segmentation (janome, jieba):
they are exact, fast, reviewable in the TOML, and the same rule serves every language.

Refusals name the category ("public figures"), never the word that matched: naming it would
tell an evader exactly which spelling to vary next. The matched term goes to the audit log
only (`Verdict.term`). A word list cannot catch a paraphrase ("the 45th US president"); that
needs a classifier, which this module is not.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DEFAULT_LISTS = Path(__file__).with_name("safety_terms.toml")

# digit- and symbol-for-letter leetspeak (no Unicode data covers it); applied after the confusables
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s", "!": "i", "|": "l"})  # fmt: skip
_WILDCARDS = frozenset("0123456789@$!|")  # a character of these inside a word may stand for any letter
_WILDCARD_CHARS = re.compile("[0-9@$!|]")

# CJK radicals and symbols, kana, CJK ideographs, Yi, Hangul, compatibility ideographs, half-width kana, ext B+
_CJK_CLASS = "\u2e80-\ud7ff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff"
_CJK = re.compile(f"[{_CJK_CLASS}]")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
_LATIN_WORD = re.compile(f"[^\\W_{_CJK_CLASS}]+")  # a run of letters/digits, not CJK; "_" separates
_REPEATS = re.compile(r"(.)\1+")
_ENTRY_KEYS = {"term", "unless_part_of"}


@cache
def _confusables() -> dict[int, str]:
    """Non-ASCII look-alikes of Latin letters -> the ASCII letter, from the Unicode confusables data.

    The data lists, for each character, the characters confusable with it; each connected class
    is mapped to its one Latin letter (a Latin small capital counts as its letter, by its Unicode
    name). Classes holding several letters (l, I, 1, |) fall back to direct pairs; CJK and kana
    are never mapped.
    """
    from confusable_homoglyphs.confusables import confusables_data

    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    direct: dict[str, set[str]] = {}
    for key, homoglyphs in confusables_data.items():
        for h in homoglyphs:
            c = h["c"]
            if len(key) == 1 and len(c) == 1:
                parent[find(key)] = find(c)
                for a, b in ((key, c), (c, key)):
                    if b.isascii() and b.isalpha() and not a.isascii():
                        direct.setdefault(a, set()).add(b.lower())

    def anchor(c: str) -> str | None:
        if c.isascii():
            return c.lower() if c.isalpha() else None
        m = re.fullmatch(r"LATIN LETTER SMALL CAPITAL ([A-Z])", unicodedata.name(c, ""))
        return m.group(1).lower() if m else None

    classes: dict[str, list[str]] = {}
    for c in list(parent):
        classes.setdefault(find(c), []).append(c)
    out: dict[int, str] = {}
    for members in classes.values():
        letters = {a for a in map(anchor, members) if a}
        for c in members:
            if c.isascii() or _CJK.match(c):
                continue
            if len(letters) == 1:
                out[ord(c)] = next(iter(letters))
            elif len(direct.get(c, ())) == 1:
                out[ord(c)] = next(iter(direct[c]))
    for cp in range(0x80, 0x10800):  # Latin small capitals the confusables data does not list (ᴛ, ʀ, ᴘ)
        if (a := anchor(chr(cp))) is not None:
            out.setdefault(cp, a)
    return out


@cache
def _t2s() -> dict[int, str]:
    """Traditional -> simplified Chinese, character by character, as a `str.translate` table.

    OpenCC's TSCharacters table as the `opencc-python-reimplemented` package ships it, first
    candidate first, as its converter does. Its phrase pass is left out: it costs ~0.3 ms per
    prompt, and terms and prompts are folded alike, so characters are all that matching needs."""
    from importlib.resources import files

    table: dict[int, str] = {}
    for line in files("opencc").joinpath("dictionary", "TSCharacters.txt").read_text("utf-8").splitlines():
        trad, _, simp = line.partition("\t")
        if len(trad) == 1 and simp:
            table[ord(trad)] = simp.split(" ")[0]
    return table


@cache
def _tables() -> tuple[dict[int, str | None], re.Pattern]:
    """The confusables map plus deletions (format and control characters; control whitespace -> a
    space), and a pattern for the combining marks that follow an ASCII letter."""
    table: dict[int, str | None] = dict(_confusables())
    marks: list[int] = []
    for cp in (*range(0x40000), *range(0xE0000, 0xE1000)):  # planes 0-3; tags, variation selectors
        cat = unicodedata.category(chr(cp))
        if cat in ("Cf", "Cc"):  # zero-width joiners, soft hyphens, bidi marks, controls
            table[cp] = " " if chr(cp).isspace() else None
        elif cat in ("Mn", "Me") and not (0xD800 <= cp < 0xE000):
            marks.append(cp)
    ranges: list[list[int]] = []  # as ranges, or the character class is slow to test
    for cp in marks:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    cls = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return table, re.compile(f"([\\x00-\\x7f])[{cls}]+")


def _fold_base(text: str) -> str:
    """Everything fold() does except the leetspeak digits."""
    table, marks_after_ascii = _tables()
    if text.isascii():
        return text.lower().translate(table)
    t = unicodedata.normalize("NFKC", text).translate(table)  # before casefold: capitals (Greek Ρ -> p)
    t = unicodedata.normalize("NFKD", t.casefold()).translate(table)
    t = unicodedata.normalize("NFC", marks_after_ascii.sub(r"\1", t))  # ü -> u; kana voicing marks stay (プ)
    if _HAN.search(t):
        t = t.translate(_t2s())
    return t


def fold(text: str) -> str:
    """A canonical form for matching: NFKC, casefold, no invisibles, no accents on Latin letters,
    look-alikes folded to Latin letters, traditional Chinese to simplified, leetspeak digits to letters."""
    return _fold_base(text).translate(_LEET)


def _collapse(word: str) -> str:
    return _REPEATS.sub(r"\1", word)


def _pinyin(han: str) -> list[str]:
    from pypinyin import lazy_pinyin

    return [s for s in (fold(p) for p in lazy_pinyin(han, v_to_u=True)) if s.isalpha() and s.isascii()]


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    category: str = ""
    term: str = ""  # for the audit log only; refusals name the category


@dataclass(frozen=True)
class _Latin:
    category: str
    term: str  # as listed (for the audit log)
    key: str  # the letters of the term, joined (collapsed unless pinyin)
    single_window: bool  # may match as one prompt word ("donaldtrump"), not for "bomb a" vs "bomba"
    unless: tuple[tuple[str, ...], ...]  # harmless phrases, as word tuples
    pinyin: bool


@dataclass(frozen=True)
class _Cjk:
    category: str
    term: str
    key: str
    unless: tuple[tuple[str, int], ...]  # (harmless phrase, offset of the term in it)


class SafetyFilter:
    def __init__(self, lists: dict[str, list[str | dict]]):
        """`lists`: category -> terms; a term is a string, or a dict {"term": …, "unless_part_of": [...]}."""
        self.latin: list[_Latin] = []
        self.cjk: list[_Cjk] = []
        self.vocab: dict[int, set[str]] = {}  # words of the Latin terms by length, for leetspeak wildcards
        seen: set[tuple[str, str]] = set()
        for cat, entries in lists.items():
            for entry in entries:
                if isinstance(entry, str):
                    term, unless = entry, []
                else:
                    unknown = set(entry) - _ENTRY_KEYS
                    if unknown or "term" not in entry:
                        raise ValueError(
                            f"safety list {cat}: bad entry {entry!r} (keys: term, unless_part_of)"
                        )
                    term, unless = str(entry["term"]), list(entry.get("unless_part_of", []))
                self._add(cat, term, unless, seen)
        # pinyin? -> the first three letters -> the Latin terms, so a check looks up each word start once
        self._by_prefix: dict[bool, dict[str, list[_Latin]]] = {False: {}, True: {}}
        for t in self.latin:
            self._by_prefix[t.pinyin].setdefault(t.key[:3], []).append(t)
        self._prefix_lengths = sorted({min(len(t.key), 3) for t in self.latin})
        self._has_pinyin = any(t.pinyin for t in self.latin)

    def _add(self, cat: str, term: str, unless: list[str], seen: set) -> None:
        f = fold(term)
        if _CJK.search(f):
            if _LATIN_WORD.search(f):
                raise ValueError(f"safety list {cat}: {term!r} mixes CJK and Latin letters; list them apart")
            key = "".join(_CJK.findall(f))
            if (cat, key) in seen:
                return
            seen.add((cat, key))
            phrases = []
            for u in unless:
                p = "".join(_CJK.findall(fold(u)))
                if key not in p or p == key or _LATIN_WORD.search(fold(u)):
                    raise ValueError(f"safety list {cat}: {u!r} does not contain {term!r} with CJK context")
                phrases += [(p, m.start()) for m in re.finditer(f"(?={re.escape(key)})", p)]
            self.cjk.append(_Cjk(cat, term, key, tuple(phrases)))
            if all(_HAN.match(c) for c in key):
                syllables = _pinyin(key)
                if len(syllables) >= 2 and (cat, "py:" + "".join(syllables)) not in seen:
                    seen.add((cat, "py:" + "".join(syllables)))
                    self.latin.append(
                        _Latin(
                            cat, f"{term} (pinyin {' '.join(syllables)})", "".join(syllables), True, (), True
                        )
                    )
            return
        words = [_collapse(w) for w in _LATIN_WORD.findall(f)]
        if not words:
            return
        key = _collapse("".join(words))
        if (cat, key) in seen:
            return
        seen.add((cat, key))
        phrases = tuple(tuple(_collapse(w) for w in _LATIN_WORD.findall(fold(u))) for u in unless)
        for u, p in zip(unless, phrases, strict=True):
            if key not in _collapse("".join(p)) or p == tuple(words):
                raise ValueError(f"safety list {cat}: {u!r} does not contain {term!r} with context")
        self.latin.append(_Latin(cat, term, key, all(len(w) > 1 for w in words), phrases, False))
        for w in words:
            if len(w) >= 4:
                self.vocab.setdefault(len(w), set()).add(w)

    @classmethod
    def load(cls, path: Path | None = None) -> SafetyFilter:
        data = tomllib.loads(Path(path or DEFAULT_LISTS).read_text(encoding="utf-8"))
        return cls({cat: list(v.get("terms", [])) + list(v.get("ambiguous", [])) for cat, v in data.items()})

    def check(self, *texts: str) -> Verdict:
        for text in texts:
            if text:
                verdict = self._check(text)
                if verdict.blocked:
                    return verdict
        return Verdict(False)

    def _wildcard(self, word: str, raw: str) -> str:
        """A word with digits in it ("tr0mp"): a listed word that it spells with each digit as any letter."""
        holes = [i for i, c in enumerate(raw) if c in _WILDCARDS]
        if not holes or len(raw) - len(holes) < 3 or len(holes) > len(raw) // 3:
            return word
        for cand in self.vocab.get(len(raw), ()):
            if all(
                c == r or i in holes for i, (c, r) in enumerate(zip(cand, raw.translate(_LEET), strict=True))
            ):
                return cand
        return word

    def _check(self, text: str) -> Verdict:
        base = _fold_base(text)
        folded = base.translate(_LEET)
        plain = _LATIN_WORD.findall(folded)  # as written, for pinyin ("pu ding" is not "pudding")
        changed = False
        if _WILDCARD_CHARS.search(base):  # leetspeak: "tr0mp" may be "trump"
            for n, m in enumerate(_LATIN_WORD.finditer(folded)):
                raw = base[m.start() : m.end()]
                if _WILDCARD_CHARS.search(raw):
                    w = self._wildcard(plain[n], _collapse_with(raw, plain[n]))
                    changed |= w != plain[n]
                    plain[n] = w
        words = [_collapse(w) for w in plain] if changed else _LATIN_WORD.findall(_collapse(folded))
        for pinyin, ws in ((False, words), (True, plain))[: 1 + self._has_pinyin]:
            # the words run together; a term counts where it starts and ends on word boundaries
            joined, starts, ends = _joined(ws, collapse=not pinyin)
            by_prefix = self._by_prefix[pinyin]
            for i, a in starts.items():
                for n in self._prefix_lengths:
                    for t in by_prefix.get(joined[i : i + n], ()):
                        b = ends.get(i + len(t.key))
                        if b is None or not joined.startswith(t.key, i) or (a == b and not t.single_window):
                            continue
                        if not any(_covers(words, p, a, b) for p in t.unless):
                            return Verdict(True, t.category, t.term)
        cjk = "".join(_CJK.findall(folded))
        if cjk:
            for t in self.cjk:
                i = cjk.find(t.key)
                while i != -1:
                    if not any(i >= off and cjk.startswith(p, i - off) for p, off in t.unless):
                        return Verdict(True, t.category, t.term)
                    i = cjk.find(t.key, i + 1)
        return Verdict(False)


def _collapse_with(raw: str, word: str) -> str:
    """`raw` (digits kept) with the repeats of `word` (digits folded) collapsed alike: "tr00mp" -> "tr0mp"."""
    out = []
    for i, c in enumerate(raw):
        if i and word[i] == word[i - 1]:
            continue
        out.append(c)
    return "".join(out)


def _joined(words: list[str], collapse: bool) -> tuple[str, dict[int, int], dict[int, int]]:
    """The words run together, with the offsets where each word starts and ends (-> its index).

    Collapsed, a letter shared across a boundary is written once ("mass shooting" -> "mashoting")
    and the next word starts on it."""
    s = ""
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for n, w in enumerate(words):
        if collapse and s and s[-1] == w[0]:
            starts.setdefault(len(s) - 1, n)
            s += w[1:]
        else:
            starts.setdefault(len(s), n)
            s += w
        ends[len(s)] = n
    return s, starts, ends


def _covers(words: list[str], phrase: tuple[str, ...], a: int, b: int) -> bool:
    """Whether the prompt words a..b lie inside an occurrence of `phrase` (a harmless phrase)."""
    n = len(phrase)
    return any(tuple(words[k : k + n]) == phrase for k in range(max(0, b - n + 1), a + 1))
