"""A procedural world of one moving shape on a plain background.

Every clip is fully described by a :class:`ClipSpec` (background, shape, colour, size, motion), so a
caption written from the spec is always true of the frames. This is the training data of the embedded
text-to-video model and the ground truth its prompt-adherence evaluation is scored against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "navy")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
CORE_MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
EXTRA_MOTIONS: tuple[str, ...] = ("grow", "shrink")
MOTIONS: tuple[str, ...] = CORE_MOTIONS + EXTRA_MOTIONS

# Saturated, well separated hues so that every pair stays distinguishable after the VAE / a small
# model blurs them; navy is dark enough that a blue object on it still has strong contrast.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
}
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 20),
    "green": (30, 190, 50),
    "cyan": (0, 220, 230),
    "blue": (30, 90, 255),
    "purple": (150, 40, 220),
    "white": (245, 245, 245),
}

# Object extent (bounding-box side) as a fraction of the shorter frame side.
SIZE_FRACTION: dict[str, float] = {"small": 0.22, "large": 0.38}
# Net travel of a moving object, as a fraction of the frame side along the motion axis.
TRAVEL_RANGE: tuple[float, float] = (0.45, 0.55)
# grow/shrink scale the object by GROW_FACTOR over the clip, centred on the named size so that the
# median frame still shows a "small" or "large" object.
GROW_FACTOR = 2.0
_SUPERSAMPLE = 4
_SUBPIXEL_BITS = 4  # cv2 drawing `shift`: coordinates carry 4 fractional bits


@dataclass(frozen=True)
class ClipSpec:
    """Everything that a caption can say about a clip."""

    background: str
    shape: str
    color: str
    size: str
    motion: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("background", self.background, BACKGROUNDS),
            ("shape", self.shape, SHAPES),
            ("color", self.color, COLORS),
            ("size", self.size, SIZES),
            ("motion", self.motion, MOTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
        if self.color == self.background:
            raise ValueError(f"a {self.color} object on a {self.background} background is invisible")


@dataclass(frozen=True, eq=False)
class Clip:
    """Rendered frames (T, H, W, 3) uint8 RGB, their spec and one caption per language."""

    frames: np.ndarray
    spec: ClipSpec
    captions: dict[str, str] = field(default_factory=dict)


def sample_spec(rng: np.random.Generator, motions: Sequence[str] = CORE_MOTIONS) -> ClipSpec:
    """Draw a uniformly random valid spec (never a white object on a white background)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colors = [c for c in COLORS if c != background]
    return ClipSpec(
        background=background,
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=colors[rng.integers(len(colors))],
        size=SIZES[rng.integers(len(SIZES))],
        motion=motions[rng.integers(len(motions))],
    )


# (t in [0, 1]) -> (centre x, centre y, extent), all in output pixels; x grows right, y grows down.
Trajectory = Callable[[float], tuple[float, float, float]]


def _trajectory(motion: str, extent: float, height: int, width: int, rng: np.random.Generator) -> Trajectory:
    """A straight constant-speed path that keeps the whole object inside the frame.

    Always draws the same number of random values whatever the motion, so that a seed gives the
    same clip layout at every resolution.
    """
    side = min(height, width)
    margin = max(1.0, 0.03 * side)  # keep anti-aliased edges off the border the detector samples
    travel_frac, u_along, u_across = rng.uniform(*TRAVEL_RANGE), rng.random(), rng.random()

    if motion in EXTRA_MOTIONS:
        lo_scale = 1.0 / math.sqrt(GROW_FACTOR)
        biggest = extent * math.sqrt(GROW_FACTOR)
        cx = margin + biggest / 2 + u_along * max(0.0, width - 2 * margin - biggest)
        cy = margin + biggest / 2 + u_across * max(0.0, height - 2 * margin - biggest)
        sign = 1.0 if motion == "grow" else -1.0

        def scaled(t: float) -> tuple[float, float, float]:
            # Geometric growth: the same relative change per frame, and the named size at t = 0.5.
            s = lo_scale * GROW_FACTOR ** (t if sign > 0 else 1.0 - t)
            return cx, cy, extent * s

        return scaled

    def span(length: int) -> tuple[float, float]:
        return margin + extent / 2, length - margin - extent / 2

    if motion == "still":
        (x0, x1), (y0, y1) = span(width), span(height)
        cx, cy = x0 + u_along * (x1 - x0), y0 + u_across * (y1 - y0)
        return lambda t: (cx, cy, extent)

    horizontal = motion in ("left", "right")
    along_len, across_len = (width, height) if horizontal else (height, width)
    a0, a1 = span(along_len)
    b0, b1 = span(across_len)
    travel = min(travel_frac * along_len, a1 - a0)
    start = a0 + u_along * (a1 - a0 - travel)
    across = b0 + u_across * (b1 - b0)
    forward = motion in ("right", "down")  # image axes point right and down

    def moving(t: float) -> tuple[float, float, float]:
        a = start + (t if forward else 1.0 - t) * travel
        return (a, across, extent) if horizontal else (across, a, extent)

    return moving


def _shape_points(shape: str, cx: float, cy: float, extent: float) -> np.ndarray:
    """Polygon vertices (N, 2) in output-pixel coordinates for the polygonal shapes."""
    h = extent / 2
    if shape == "square":
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    if shape == "triangle":  # upright equilateral triangle, centred on its bounding box
        th = extent * math.sqrt(3) / 4
        return np.array([[cx, cy - th], [cx + h, cy + th], [cx - h, cy + th]])
    raise ValueError(f"no polygon for shape {shape!r}")


def _coverage(
    shape: str, cx: float, cy: float, extent: float, height: int, width: int
) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of the object: (alpha (h, w) float32 in [0, 1], y0, x0) of its box.

    Draws binary at 4x supersampling and box-filters down (INTER_AREA), which gives each output pixel
    the fraction of its area that the shape covers. Only the object's bounding box is drawn.
    """
    half = extent / 2 + 1
    x0, x1 = max(0, math.floor(cx - half)), min(width, math.ceil(cx + half))
    y0, y1 = max(0, math.floor(cy - half)), min(height, math.ceil(cy + half))
    ss, scale = _SUPERSAMPLE, _SUPERSAMPLE * (1 << _SUBPIXEL_BITS)
    canvas = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss), np.uint8)

    def fixed(v: np.ndarray | float) -> np.ndarray:
        # Output pixel k spans [k, k+1); supersampled pixel centres sit at (j + 0.5) / ss.
        return np.round((np.asarray(v, np.float64) - 0.5 / ss) * scale).astype(np.int32)

    if shape == "circle":
        center = fixed(np.array([cx - x0, cy - y0]))
        radius = int(round(extent / 2 * scale))
        cv2.circle(canvas, (int(center[0]), int(center[1])), radius, 255, -1, cv2.LINE_8, _SUBPIXEL_BITS)
    else:
        pts = fixed(_shape_points(shape, cx, cy, extent) - np.array([x0, y0]))
        cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], 255, cv2.LINE_8, _SUBPIXEL_BITS)
    alpha = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return alpha.astype(np.float32) / 255.0, y0, x0


def _background(name: str, height: int, width: int, rng: np.random.Generator, texture: bool) -> np.ndarray:
    """(H, W, 3) float32 background: flat, or with a faint vertical gradient and fixed fine grain."""
    bg = np.broadcast_to(np.array(BACKGROUND_RGB[name], np.float32), (height, width, 3)).copy()
    if texture:
        # Subtle on purpose: the clip still reads as "a black background", not as a second object.
        amplitude = rng.uniform(5.0, 12.0) * rng.choice([-1.0, 1.0])
        ramp = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None, None]
        grain = rng.normal(0.0, 2.5, size=(height, width, 1)).astype(np.float32)
        bg += amplitude * ramp + grain
    return np.clip(bg, 0.0, 255.0)


def render_clip(
    spec: ClipSpec,
    *,
    num_frames: int,
    height: int,
    width: int,
    rng: np.random.Generator | None = None,
    texture: bool = False,
) -> np.ndarray:
    """Render `spec` as (num_frames, height, width, 3) uint8 RGB.

    Frame i samples the continuous trajectory at t = i / (num_frames - 1), so the same seed gives the
    same motion at any frame count. `rng` jitters the start position (default: a fixed seed).
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to show motion; got {num_frames}")
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise ValueError(f"height and width must be in [16, 4096]; got {height}x{width}")
    rng = np.random.default_rng(0) if rng is None else rng
    extent = SIZE_FRACTION[spec.size] * min(height, width)
    path = _trajectory(spec.motion, extent, height, width, rng)
    bg = _background(spec.background, height, width, rng, texture)
    base = np.round(bg).astype(np.uint8)
    color = np.array(COLOR_RGB[spec.color], np.float32)

    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        cx, cy, ext = path(i / (num_frames - 1))
        alpha, y0, x0 = _coverage(spec.shape, cx, cy, ext, height, width)
        frames[i] = base
        h, w = alpha.shape
        a = alpha[..., None]
        region = bg[y0 : y0 + h, x0 : x0 + w]
        frames[i, y0 : y0 + h, x0 : x0 + w] = np.round(region * (1.0 - a) + color * a).astype(np.uint8)
    return frames


def make_clip(
    seed: int,
    *,
    num_frames: int,
    height: int,
    width: int,
    split: str = "train",
    motions: Sequence[str] = CORE_MOTIONS,
    texture: bool = False,
) -> Clip:
    """One captioned training (or held-out) example, fully determined by `seed`.

    Spec, layout and captions come from independent streams of the seed, so changing the resolution,
    frame count or texture flag changes none of them.
    """
    from .captions import LANGS, caption  # captions imports ClipSpec from here

    spec_seq, render_seq, caption_seq = np.random.SeedSequence(seed).spawn(3)
    spec = sample_spec(np.random.default_rng(spec_seq), motions)
    frames = render_clip(
        spec,
        num_frames=num_frames,
        height=height,
        width=width,
        rng=np.random.default_rng(render_seq),
        texture=texture,
    )
    caption_rng = np.random.default_rng(caption_seq)
    captions = {lang: caption(spec, lang, caption_rng, split) for lang in LANGS}
    return Clip(frames=frames, spec=spec, captions=captions)
