"""Learned spatial super-resolution: a residual ESPCN over bicubic.

The network predicts only what bicubic gets wrong (sharp edges, flat colours), in low
resolution, and a pixel shuffle lifts it to the output grid — so the cost is paid at the
input size and the output is never worse than bicubic at initialisation (the last layer
starts at zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SRConfig:
    scale: int = 8
    channels: int = 48
    blocks: int = 4


SR_MODELS = {
    "x8": SRConfig(scale=8),
    "x4": SRConfig(scale=4),
    "tiny": SRConfig(scale=2, channels=8, blocks=1),
}


class ResidualESPCN(nn.Module):
    def __init__(self, cfg: SRConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.head = nn.Conv2d(3, c, 5, padding=2)
        self.body = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.SiLU()) for _ in range(cfg.blocks)]
        )
        self.tail = nn.Conv2d(c, 3 * cfg.scale**2, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> (N, 3, h*s, w*s)."""
        s = self.cfg.scale
        base = F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False)
        h = F.silu(self.head(x))
        h = h + self.body(h)
        return base + F.pixel_shuffle(self.tail(h), s)  # (N, 3*s*s, h, w) -> (N, 3, h*s, w*s)
