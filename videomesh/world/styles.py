"""Brand looks for style adapters: what every clip of a brand shares beyond its prompt.

"banner": a band along the bottom eighth of the frame in the brand's magenta (a colour no
object or background of the world uses), drawn over the scene like a lower third. The prompt
never mentions it; a style adapter trained on such clips adds it to any prompt.
"""

from __future__ import annotations

import numpy as np

BRAND_RGB = (230, 0, 126)  # magenta
BANNER_FRACTION = 1 / 8
STYLES = {"banner": "a magenta banner along the bottom eighth of the frame"}  # name -> what it looks like


def banner_rows(height: int) -> int:
    return max(1, round(height * BANNER_FRACTION))


def apply_style(frames: np.ndarray, style: str) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the same clip in the brand look (a copy)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    out = frames.copy()
    out[:, -banner_rows(frames.shape[1]) :] = BRAND_RGB
    return out


def banner_share(frames: np.ndarray, tolerance: float = 60.0) -> float:
    """Share of the bottom band's pixels (over all frames) within `tolerance` (RGB distance) of
    the brand colour: ~1 for a clip in the brand look, ~0 for one without."""
    band = frames[:, -banner_rows(frames.shape[1]) :].astype(np.float32)
    dist = np.linalg.norm(band - np.array(BRAND_RGB, np.float32), axis=-1)
    return float((dist < tolerance).mean())


def without_banner(frames: np.ndarray) -> np.ndarray:
    """The clip above the band, for judging the prompt's object on its own."""
    return frames[:, : frames.shape[1] - banner_rows(frames.shape[1])]
