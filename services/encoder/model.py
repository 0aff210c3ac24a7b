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


TEXT_ENCODERS = {
    "tiny": TextEncoderConfig(buckets=512, dim=32, layers=1, heads=2, max_len=64),
    "default": TextEncoderConfig(),
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
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim * cfg.mlp_ratio),
            nn.GELU(),
            nn.Linear(cfg.dim * cfg.mlp_ratio, cfg.dim),
        )

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Hashed-character transformer: (ids, mask) -> token states (B, L, dim)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.buckets, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, ~mask)
        x = self.norm(x)
        return x * mask.unsqueeze(-1)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize(texts, self.cfg)
        return self(ids, mask).float(), mask


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
