"""Quality checks, computed frame by frame so the service can run while frames stream in.

Each check keeps O(1) state per frame (a few numbers), never the frames themselves, and
ends with a CheckResult: a score, a verdict and the offending frame ranges. Thresholds live
in QCThresholds (one place, loaded from config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np


@dataclass(frozen=True)
class QCThresholds:
    black_luma: float = 16.0  # mean luma below this = a black frame
    white_luma: float = 245.0  # mean luma above this = a blown-out frame
    flicker_luma_jump: float = 25.0  # |Δ mean luma| between neighbours beyond the clip's usual change
    frozen_diff: float = 0.3  # mean |Δ| (0..255) below which two frames count as identical
    frozen_run_seconds: float = 1.0  # this long identical = a frozen run
    min_motion: float = 0.5  # mean |Δ| over the clip below this = no motion


@dataclass
class Check:
    name: str
    score: float
    passed: bool
    detail: str
    frames: list[tuple[int, int]] = field(default_factory=list)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) ranges where flags is true."""
    out, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(flags)))
    return out


class FrameStats:
    """Per-frame statistics gathered incrementally."""

    def __init__(self, size: int = 64):
        self.size = size
        self.luma: list[float] = []
        self.diff: list[float] = []  # mean |frame_i - frame_{i-1}| on a small grey thumbnail
        self._prev: np.ndarray | None = None

    def add(self, frame: np.ndarray) -> None:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        self.luma.append(float(gray.mean()))
        thumb = cv2.resize(gray, (self.size, self.size), interpolation=cv2.INTER_AREA).astype(np.float32)
        if self._prev is not None:
            self.diff.append(float(np.abs(thumb - self._prev).mean()))
        self._prev = thumb


def run_checks(stats: FrameStats, *, fps: float, expect_motion: bool, th: QCThresholds) -> list[Check]:
    luma = np.asarray(stats.luma)
    diff = np.asarray(stats.diff)
    n = len(luma)
    checks = []

    black = luma < th.black_luma
    checks.append(
        Check(
            "black_frames",
            float(black.mean()) if n else 0.0,
            not black.any(),
            f"{int(black.sum())} of {n} frames are black",
            _runs(black),
        )
    )
    white = luma > th.white_luma
    checks.append(
        Check(
            "white_frames",
            float(white.mean()) if n else 0.0,
            not white.any(),
            f"{int(white.sum())} of {n} frames are blown out",
            _runs(white),
        )
    )

    # flicker: a luma jump up then back down (or down then up) much larger than the clip's typical change
    jumps = np.abs(np.diff(luma)) if n > 1 else np.zeros(0)
    base = float(np.median(jumps)) if len(jumps) else 0.0
    spikes = jumps > th.flicker_luma_jump + 3 * base
    flick = np.zeros(n, bool)
    flick[1:] |= spikes
    checks.append(
        Check(
            "flicker",
            float(jumps.max() - base) if len(jumps) else 0.0,
            not spikes.any(),
            f"{int(spikes.sum())} brightness jumps above {th.flicker_luma_jump:.0f} (+3x the clip's median change {base:.1f})",
            _runs(flick),
        )
    )

    same = diff < th.frozen_diff
    run_len = max(2, int(round(th.frozen_run_seconds * fps)))
    frozen = np.zeros(n, bool)
    for s, e in _runs(same):
        if e - s + 1 >= run_len:
            frozen[s : e + 1] = True
    motion = float(diff.mean()) if len(diff) else 0.0
    still = expect_motion and motion < th.min_motion
    checks.append(
        Check(
            "frozen",
            motion,
            not frozen.any() and not still,
            ("no motion although the prompt asks for it; " if still else "")
            + f"{int(frozen.sum())} frames in identical runs",
            _runs(frozen) if frozen.any() else ([(0, n)] if still else []),
        )
    )
    return checks
