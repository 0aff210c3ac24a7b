"""An independent judge of prompt adherence for world-style clips, built on plain OpenCV.

It reads frames the way a person would — what is the backdrop, what colour is the thing on it, is it
round, square or triangular, big or small, where does it go — and knows nothing of how the generator
draws: it shares only the label words. So it can score the generator itself, the trained model's
outputs, and anything in between (noisy, blurred, upscaled, re-encoded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

# The label vocabulary (the only thing shared with the world generator; a test checks they agree).
BACKGROUND_LABELS: tuple[str, ...] = ("black", "white", "gray", "navy")
COLOR_LABELS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SHAPE_LABELS: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_LABELS: tuple[str, ...] = ("small", "large")
MOTION_LABELS: tuple[str, ...] = ("left", "right", "up", "down", "still", "grow", "shrink")

# Hue bands in degrees (start, name), read as "from start up to the next start": the everyday meaning
# of each colour word, not any particular renderer's RGB values.
_HUE_BANDS: tuple[tuple[float, str], ...] = (
    (0.0, "red"),
    (15.0, "orange"),
    (42.0, "yellow"),
    (70.0, "green"),
    (165.0, "cyan"),
    (200.0, "blue"),
    (255.0, "purple"),
    (330.0, "red"),
)
# Shape features and their ideal values. Outline features (from the traced contour): fill of the
# min-area rectangle, fill of the min enclosing triangle, circularity 4*pi*A/P^2. Moment features:
# |c30| / m00^2.5 and |c40| / m00^3 of the soft mask, divided by their ideal triangle / square values.
# c_p0 = sum(alpha * (z - z0)^p) is unchanged by any rotationally symmetric blur and vanishes under
# q-fold symmetry unless q divides p: a circle has neither, a square only c40, a triangle only c30.
# So these two stay reliable on a blurred 7-pixel object where the outline no longer is.
_TRIANGLE_C30 = 0.06754  # |c30| / m00^2.5 of an equilateral triangle (numerical integration)
_SQUARE_C40 = 1 / 60  # |c40| / m00^3 of a square
_SHAPE_PROTOTYPES: dict[str, tuple[float, ...]] = {
    "circle": (math.pi / 4, math.pi / (3 * math.sqrt(3)), 1.0, 0.0, 0.0),
    "square": (1.0, 0.5, math.pi / 4, 0.0, 1.0),
    "triangle": (0.5, 1.0, math.pi * math.sqrt(3) / 9, 1.0, 0.0),
}
# The moment features count double: on small blurred objects they are the ones still right.
_SHAPE_WEIGHTS = np.array([1.0, 1.0, 1.0, 2.0, 2.0])
_STILL_MAX_SHIFT = 0.10  # net displacement below 10% of the frame side reads as "still"
_SCALE_CHANGE = 1.6  # area ratio (last third / first third) beyond which the object grows or shrinks
_LARGE_EXTENT = 0.30  # an object spanning 30% or more of the shorter frame side is "large"
_SHAPE_FRAMES = 9  # frames analysed for shape and size (spread over the clip)


class SpecLike(Protocol):
    """What :func:`score` needs of a spec (``ClipSpec`` fits)."""

    background: str
    color: str
    shape: str
    size: str
    motion: str


@dataclass
class Detection:
    """What the judge saw. Labels are None where it could not tell; the rest is for debugging."""

    background: str | None
    color: str | None
    shape: str | None
    size: str | None
    motion: str | None
    centroids: np.ndarray  # (T, 2) object centre (x, y) in pixels; NaN where no object was found
    areas: np.ndarray  # (T,) object area in pixels (anti-aliased edges count fractionally); NaN if none
    background_rgb: tuple[float, float, float] | None = None
    object_rgb: tuple[float, float, float] | None = None
    extent: float = math.nan  # median object extent / shorter frame side
    displacement: tuple[float, float] = (math.nan, math.nan)  # fitted (dx / W, dy / H) over the clip
    area_ratio: float = math.nan  # mean area of the last third of frames / first third
    shape_votes: dict[str, int] = field(default_factory=dict)


@dataclass
class _FrameObject:
    centroid: tuple[float, float]  # (x, y) in frame pixels
    area: float
    rgb: np.ndarray  # (3,) median colour of the object's interior
    alpha: np.ndarray  # (h, w) soft coverage in [0, 1] of a box around the object, zero outside it
    alpha_noise: float  # standard deviation of pixel noise in alpha units


def _background_model(frame: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Background from the frame border: (per-row colour (H, 1, 3), noise sigma, median border RGB).

    A straight line through the top and bottom thirds of the side borders absorbs vertical gradients;
    medians ignore anything that strays onto the border.
    """
    h, w, _ = frame.shape
    b = max(1, min(h, w) // 32)
    sides = np.concatenate([frame[:, :b], frame[:, w - b :]], axis=1)  # (H, 2b, 3)
    rows = np.median(sides, axis=1)  # (H, 3)
    k = max(1, h // 3)
    top, bottom = np.median(rows[:k], axis=0), np.median(rows[h - k :], axis=0)
    y_top, y_bottom = (k - 1) / 2, h - 1 - (k - 1) / 2
    t = (np.arange(h, dtype=np.float32) - y_top) / (y_bottom - y_top)
    bg_rows = (top + (bottom - top) * t[:, None]).astype(np.float32)[:, None, :]  # (H, 1, 3)

    strips = [sides - bg_rows, frame[:b] - bg_rows[:b], frame[h - b :] - bg_rows[h - b :]]
    sigma = 1.4826 * float(np.median(np.abs(np.concatenate([r.reshape(-1, 3) for r in strips]))))
    border = [sides, frame[:b], frame[h - b :]]
    rgb = np.median(np.concatenate([r.reshape(-1, 3) for r in border]), axis=0)
    return bg_rows, sigma, rgb


def _find_object(frame: np.ndarray, bg_rows: np.ndarray, sigma: float) -> _FrameObject | None:
    """The largest blob that stands out from the background, with soft (anti-aliased) coverage."""
    h, w, _ = frame.shape
    dist = np.linalg.norm(frame - bg_rows, axis=2)  # (H, W)
    mask = (dist > max(30.0, 5.0 * sigma)).astype(np.uint8)
    if min(h, w) >= 64:  # removes speckle; at 32 px it would eat the tip of a small triangle
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh, count = stats[best]
    if count < 3:
        return None
    # Work in the blob's box grown by 3 px, enough for blurred edges and the 2-px dilation below.
    x0, y0, x1, y1 = max(0, x - 3), max(0, y - 3), min(w, x + bw + 3), min(h, y + bh + 3)
    blob = labels[y0:y1, x0:x1] == best
    box, box_dist, box_bg = frame[y0:y1, x0:x1], dist[y0:y1, x0:x1], bg_rows[y0:y1]
    # The interior (the most distant 40% of the blob) gives the true colour, free of edge blending.
    core = blob & (box_dist >= np.percentile(box_dist[blob], 60))
    rgb = np.median(box[core], axis=0)
    # Soft coverage: how far each pixel lies along background -> object colour. Summed over the blob
    # (grown a little to catch blurred edges) it measures the area to a fraction of a pixel.
    direction = rgb - box_bg  # (h, 1, 3)
    contrast2 = np.maximum((direction**2).sum(axis=2), 1e-6)  # (h, 1)
    alpha = ((box - box_bg) * direction).sum(axis=2) / contrast2
    grown = cv2.dilate(blob.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    alpha = np.where(grown, np.clip(alpha, 0.0, 1.0), 0.0).astype(np.float32)
    area = float(alpha.sum())
    if area <= 0:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1]
    centroid = (float((alpha * (xs + 0.5)).sum() / area), float((alpha * (ys + 0.5)).sum() / area))
    noise = sigma / math.sqrt(float(contrast2.min()))
    return _FrameObject(centroid=centroid, area=area, rgb=rgb, alpha=alpha, alpha_noise=noise)


def _shape_features(alpha: np.ndarray, alpha_noise: float) -> tuple[tuple[float, ...], float] | None:
    """(features in the order of _SHAPE_PROTOTYPES, extent in pixels) of one object's coverage.

    The coverage is upsampled before tracing, so the outline of a 7-pixel object is sub-pixel
    accurate instead of a staircase; the convex hull removes the remaining jaggies.
    """
    crop = np.pad(alpha, 2)
    f = max(1, math.ceil(96 / max(crop.shape)))
    up = cv2.resize(crop, (crop.shape[1] * f, crop.shape[0] * f), interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((up >= 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    hull = cv2.convexHull(max(contours, key=cv2.contourArea)).astype(np.float32)
    area, perimeter = cv2.contourArea(hull), cv2.arcLength(hull, True)
    if area < 4 or perimeter <= 0:
        return None
    _, (rw, rh), _ = cv2.minAreaRect(hull)
    tri_area, _ = cv2.minEnclosingTriangle(hull)

    # High-order moments weight the faint rim most, where pixel noise dominates: drop pixels within
    # the noise. Any pointwise change keeps a shape's symmetry, so which moments vanish is unchanged.
    alpha = np.where(alpha > 2.5 * alpha_noise, alpha, 0.0)
    m00 = float(alpha.sum())
    if m00 <= 0:
        return None
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
    z = (xs - (alpha * xs).sum() / m00) + 1j * (ys - (alpha * ys).sum() / m00)  # centred, as complex
    c30, c40 = abs((alpha * z**3).sum()), abs((alpha * z**4).sum())
    features = (
        area / max(rw * rh, 1e-6),
        area / max(tri_area, 1e-6),
        4 * math.pi * area / perimeter**2,
        c30 / m00**2.5 / _TRIANGLE_C30,
        c40 / m00**3 / _SQUARE_C40,
    )
    return features, max(rw, rh) / f


def _classify_shape(features: tuple[float, ...]) -> tuple[str, float]:
    f = np.asarray(features) * _SHAPE_WEIGHTS
    dists = {
        name: math.dist(f, np.asarray(proto) * _SHAPE_WEIGHTS) for name, proto in _SHAPE_PROTOTYPES.items()
    }
    name = min(dists, key=dists.__getitem__)
    return name, dists[name]


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[float, float, float]:
    """(hue in degrees, saturation 0-1, value 0-1)."""
    pixel = np.clip(np.asarray(rgb, np.float32) / 255.0, 0.0, 1.0).reshape(1, 1, 3)
    hue, sat, val = cv2.cvtColor(pixel, cv2.COLOR_RGB2HSV)[0, 0]
    return float(hue), float(sat), float(val)


def _name_color(rgb: np.ndarray) -> str | None:
    hue, sat, val = _rgb_to_hsv(rgb)
    if val < 0.25:
        return None  # black/dark objects are not in the vocabulary
    if sat < 0.25:
        return "white" if val > 0.75 else None
    name = _HUE_BANDS[0][1]
    for start, band in _HUE_BANDS:
        if hue >= start:
            name = band
    return name


def _name_background(rgb: np.ndarray) -> str | None:
    hue, sat, val = _rgb_to_hsv(rgb)
    if sat >= 0.35 and val > 0.12:  # clearly coloured: only a dark blue is in the vocabulary
        return "navy" if 190.0 <= hue < 260.0 and val < 0.65 else None
    if val < 0.2:
        return "black"
    return "white" if val > 0.8 else "gray"


def _motion(
    centroids: np.ndarray, areas: np.ndarray, height: int, width: int
) -> tuple[str | None, tuple[float, float], float]:
    """Motion label from the centroid track and the area trend: (label, (dx, dy), area ratio)."""
    valid = np.flatnonzero(np.isfinite(areas))
    if len(valid) < 2:
        return None, (math.nan, math.nan), math.nan
    t = valid / max(len(areas) - 1, 1)
    # Slope of a least-squares line: the net travel over the clip, robust to per-frame jitter.
    dx = float(np.polyfit(t, centroids[valid, 0], 1)[0]) / width
    dy = float(np.polyfit(t, centroids[valid, 1], 1)[0]) / height
    third = max(1, len(valid) // 3)
    ratio = float(np.mean(areas[valid[-third:]]) / max(np.mean(areas[valid[:third]]), 1e-6))
    if ratio >= _SCALE_CHANGE:
        return "grow", (dx, dy), ratio
    if ratio <= 1 / _SCALE_CHANGE:
        return "shrink", (dx, dy), ratio
    if max(abs(dx), abs(dy)) < _STILL_MAX_SHIFT:
        return "still", (dx, dy), ratio
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), (dx, dy), ratio
    return ("down" if dy > 0 else "up"), (dx, dy), ratio


def detect(frames: np.ndarray) -> Detection:
    """Judge a clip: frames (T, H, W, 3) uint8 RGB."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) RGB; got shape {frames.shape}")
    num, height, width, _ = frames.shape
    centroids = np.full((num, 2), np.nan)
    areas = np.full(num, np.nan)
    objects: dict[int, _FrameObject] = {}
    border_rgbs = []
    for i, frame in enumerate(frames.astype(np.float32)):
        bg_rows, sigma, border_rgb = _background_model(frame)
        border_rgbs.append(border_rgb)
        obj = _find_object(frame, bg_rows, sigma)
        if obj is not None:
            objects[i] = obj
            centroids[i], areas[i] = obj.centroid, obj.area
    background_rgb = np.median(np.array(border_rgbs), axis=0)
    if not objects:
        return Detection(
            _name_background(background_rgb),
            None,
            None,
            None,
            None,
            centroids,
            areas,
            background_rgb=tuple(background_rgb.tolist()),
        )

    object_rgb = np.median(np.array([o.rgb for o in objects.values()]), axis=0)
    found = sorted(objects)
    picks = sorted({found[round(j)] for j in np.linspace(0, len(found) - 1, min(_SHAPE_FRAMES, len(found)))})
    votes: dict[str, int] = {}
    margins: dict[str, float] = {}
    extents = []
    for i in picks:
        result = _shape_features(objects[i].alpha, objects[i].alpha_noise)
        if result is None:
            continue
        features, extent = result
        name, dist = _classify_shape(features)
        votes[name] = votes.get(name, 0) + 1
        margins[name] = margins.get(name, 0.0) + dist
        extents.append(extent / min(height, width))
    # Majority vote; a tie goes to the shape whose frames matched their prototype more closely.
    shape = min(votes, key=lambda s: (-votes[s], margins[s] / votes[s])) if votes else None
    extent = float(np.median(extents)) if extents else math.nan
    size = None if not extents else ("large" if extent >= _LARGE_EXTENT else "small")
    motion, displacement, ratio = _motion(centroids, areas, height, width)
    return Detection(
        background=_name_background(background_rgb),
        color=_name_color(object_rgb),
        shape=shape,
        size=size,
        motion=motion,
        centroids=centroids,
        areas=areas,
        background_rgb=tuple(background_rgb.tolist()),
        object_rgb=tuple(object_rgb.tolist()),
        extent=extent,
        displacement=displacement,
        area_ratio=ratio,
        shape_votes=votes,
    )


def score(detection: Detection, spec: SpecLike) -> dict[str, bool]:
    """Per-attribute agreement between what was detected and what was asked for."""
    return {
        "background": detection.background == spec.background,
        "color": detection.color == spec.color,
        "shape": detection.shape == spec.shape,
        "size": detection.size == spec.size,
        "motion": detection.motion == spec.motion,
    }
