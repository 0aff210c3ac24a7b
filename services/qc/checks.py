"""Quality checks, computed frame by frame so the service can run while frames stream in.

Each check keeps a few numbers per frame, never the frames themselves, and ends with a
Check: a score, a verdict and the offending frame ranges. Thresholds live in
services/qc/thresholds.toml (QCThresholds), calibrated by services/qc/calibrate.py.
"""

from __future__ import annotations

import tomllib
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np

THRESHOLDS_FILE = Path(__file__).with_name("thresholds.toml")


@dataclass(frozen=True)
class QCThresholds:
    black_luma: float
    white_luma: float
    flicker_luma_jump: float
    frozen_diff: float
    frozen_changed: float
    flicker_ratio: float
    frozen_run_seconds: float
    min_motion: float
    blur_ratio: float
    blur_min_frames: int
    face_jump: float
    face_dropout_frames: int
    face_change_ratio: float
    face_size: int

    @classmethod
    def load(cls, path: Path = THRESHOLDS_FILE, **overrides) -> QCThresholds:
        data = tomllib.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown thresholds {sorted(unknown)}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class Check:
    name: str
    score: float
    passed: bool
    detail: str
    frames: list[tuple[int, int]] = field(default_factory=list)


def changed_share(a: np.ndarray, b: np.ndarray, level: int = 6) -> float:
    """Share of pixels of two colour thumbnails (H, W, 3) uint8 where some channel differs by
    more than `level` (OpenCV's per-channel max: a numpy reduction over the last axis was
    several times slower here)."""
    d = cv2.absdiff(a, b)
    c0, c1, c2 = cv2.split(d)
    m = cv2.max(cv2.max(c0, c1), c2)
    return cv2.countNonZero(cv2.threshold(m, level, 255, cv2.THRESH_BINARY)[1]) / m.size


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) ranges where flags is true."""
    f = np.concatenate([[False], np.asarray(flags, bool), [False]])
    d = np.flatnonzero(np.diff(f.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(d[::2], d[1::2], strict=True)]


_CASCADE = None


def face_detector() -> cv2.CascadeClassifier:
    """OpenCV's bundled frontal-face Haar cascade (ships inside the opencv wheel)."""
    global _CASCADE
    if _CASCADE is None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        if not path.exists():
            raise RuntimeError(
                f"{path} is missing: install opencv-python-headless<5 (5.x no longer ships the cascades)"
            )
        _CASCADE = cv2.CascadeClassifier(str(path))
    return _CASCADE


class FrameStats:
    """Per-frame statistics gathered incrementally (a few floats and boxes per frame).

    The face detector is the expensive part, so it runs on every `face_stride`-th frame;
    when the face count changes between two such frames, the frames in between (kept as
    small grey images, at most `face_stride` of them) are detected too, so a face that
    vanishes for a single frame is still seen.
    """

    def __init__(
        self,
        th: QCThresholds,
        *,
        fps: float = 24.0,
        thumb: int = 64,
        faces: bool = True,
        face_stride: int = 6,
    ):
        self.th = th
        self.lag = max(1, int(round(0.25 * fps)))  # frames in a quarter second
        self.thumb = thumb
        self.faces = faces
        self.stride = face_stride
        self.luma: list[float] = []  # mean luma
        self.peak: list[
            float
        ] = []  # 99th-percentile luma: a dark background with a visible object is not "black"
        self.floor: list[float] = []  # 1st-percentile luma
        self.diff: list[float] = []  # mean |Δ| between neighbours on a grey thumbnail
        # share of colour-thumbnail pixels where some channel changed by more than 6 levels (in
        # grey a green object on a grey background can all but vanish)
        self.changed: list[float] = []
        self.lagged: list[float] = []  # the same share between frame i and frame i - lag
        self._thumbs: deque[np.ndarray] = deque(maxlen=self.lag)  # the last colour thumbnails
        self.block: list[float] = []  # largest change of one eighth-by-eighth block of the thumbnail
        self.sharp: list[float] = []  # variance of the Laplacian at 128 px
        self.boxes: dict[int, list[tuple[float, float, float, float]]] = {}  # frame -> faces (relative units)
        self.face_change: list[float] = []  # mean |Δ| inside the current face box between neighbours
        self._prev: np.ndarray | None = None
        self._prev_img: np.ndarray | None = None
        self._box: tuple[float, float, float, float] | None = None  # last detected main face
        self._pending: list[tuple[int, np.ndarray]] = []  # undetected small greys since the last detection
        self._last_count: int | None = None

    def _detect(self, i: int, img: np.ndarray) -> int:
        ih, iw = img.shape
        found = face_detector().detectMultiScale(
            img, scaleFactor=1.15, minNeighbors=4, minSize=(max(12, ih // 8),) * 2
        )
        self.boxes[i] = [(x / iw, y / ih, bw / iw, bh / ih) for x, y, bw, bh in (found if len(found) else [])]
        if self.boxes[i]:
            self._box = max(self.boxes[i], key=lambda r: r[2] * r[3])
        return len(self.boxes[i])

    def add(self, frame: np.ndarray) -> None:
        i = len(self.luma)
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        small = cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA) if max(h, w) > 128 else gray
        thumb = cv2.resize(small, (self.thumb, self.thumb), interpolation=cv2.INTER_AREA)
        self.luma.append(float(gray.mean()))
        lo, hi = np.percentile(thumb, (1, 99))
        self.floor.append(float(lo))
        self.peak.append(float(hi))
        self.sharp.append(float(cv2.Laplacian(small, cv2.CV_32F).var()))
        rgb = cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA) if max(h, w) > 128 else frame
        rgb = cv2.resize(rgb, (self.thumb, self.thumb), interpolation=cv2.INTER_AREA)  # two halvings: fast
        if self._thumbs:
            self.changed.append(changed_share(rgb, self._thumbs[-1]))
        if self.lag > 1 and len(self._thumbs) == self.lag:  # the oldest one is frame i - lag
            self.lagged.append(changed_share(rgb, self._thumbs[0]))  # (lag 1: run_checks uses `changed`)
        self._thumbs.append(rgb)
        t = thumb.astype(np.float32)
        if self._prev is not None:
            d = np.abs(t - self._prev)
            self.diff.append(float(d.mean()))
            b = self.thumb // 8  # the most-changed 8x8 block: something appearing in one place
            self.block.append(float(d.reshape(8, b, 8, b).mean(axis=(1, 3)).max()))
        self._prev = t
        if self.faces:
            s = self.th.face_size / max(h, w)
            img = (
                cv2.resize(gray, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
                if s < 1
                else gray
            )
            self.face_change.append(self._region_change(img))
            recent, blocks = self.diff[-9:-1], self.block[-9:-1]
            spike = len(recent) >= 4 and (
                self.diff[-1] > 2.0 * float(np.median(recent)) + 1.0
                or self.block[-1] > 2.0 * float(np.median(blocks)) + 4.0
            )
            if i % self.stride and not spike:  # sampled, unless the frame changed abnormally
                self._pending.append((i, img))
                self._prev_img = img
                return
            self._sample(i, img)
            self._prev_img = img

    def _region_change(self, img: np.ndarray) -> float:
        """How much the face region changed since the previous frame (warps and smears spike here)."""
        if self._box is None or self._prev_img is None or self._prev_img.shape != img.shape:
            return 0.0
        ih, iw = img.shape
        x, y, w, h = self._box
        x0, y0, x1, y1 = int(x * iw), int(y * ih), int((x + w) * iw), int((y + h) * ih)
        d = np.abs(img.astype(np.float32) - self._prev_img.astype(np.float32))
        region = d[y0:y1, x0:x1]
        # relative to the whole frame's change: flicker, cuts and pans move everything alike, a warp only the face
        return float(region.mean() / (d.mean() + 1.0)) if region.size else 0.0

    def _sample(self, i: int, img: np.ndarray) -> None:
        n = self._detect(i, img)
        if self._last_count is not None and n != self._last_count:
            for j, im in self._pending:  # something changed in between: look at every frame
                self._detect(j, im)
        self._pending = []
        self._last_count = n

    def finish(self) -> None:
        if self.faces and self._pending:
            j, img = self._pending.pop()
            self._sample(j, img)


def _check_faces(
    boxes: dict[int, list[tuple]], n: int, ignore: np.ndarray, change: np.ndarray, th: QCThresholds
) -> Check:
    idx = [i for i in sorted(boxes) if not ignore[i]]  # black/white frames say nothing about faces
    counts = np.array([len(boxes[i]) for i in idx])
    if not len(idx) or counts.max() == 0:
        return Check("faces", 0.0, True, "no faces detected")
    typical = int(np.median(counts))
    bad = np.zeros(n, bool)
    reasons = []
    # the face region changing far more than the clip's usual change: a warp, a smear, a melt
    ok = change[~ignore] if len(change) == n else change
    ref = float(np.median(ok[ok > 0])) if (ok > 0).any() else 0.0
    distorted = (change > th.face_change_ratio * max(ref, 1.0)) & ~ignore if ref > 0 else np.zeros(n, bool)
    for s, e in runs(distorted):
        bad[s:e] = True
        reasons.append(f"face region distorted in frames {s}-{e - 1}")
    # a face that vanishes for a few frames and comes back while its region changes abnormally
    for s, e in runs(counts < typical):
        lo, hi = idx[s], idx[e - 1] + 1
        if (
            s > 0
            and e < len(idx)
            and hi - lo <= th.face_dropout_frames + 3
            and distorted[max(0, lo - 1) : hi + 1].any()
        ):
            bad[lo:hi] = True
            reasons.append(f"face lost in frames {lo}-{hi - 1}")
    for s, e in runs(counts > max(typical, 1)):
        if s > 0 and e < len(idx) and e - s < len(idx) // 2:  # a face that flashes in and out again
            bad[idx[s] : idx[e - 1] + 1] = True
            reasons.append(f"extra face in frames {idx[s]}-{idx[e - 1]}")
    # the main face jumping: centre displacement per frame, relative to its size
    prev = None
    for i in idx:
        if (
            not boxes[i] or len(boxes[i]) != typical
        ):  # compare only frames where the detector agrees with the clip
            prev = None
            continue
        x, y, w, h = max(boxes[i], key=lambda r: r[2] * r[3])
        c = np.array([x + w / 2, y + h / 2])
        if prev is not None:
            pi, pc, ps = prev
            if np.linalg.norm(c - pc) / max(ps, w, 1e-6) / (i - pi) > th.face_jump:
                bad[i] = True
                reasons.append(f"face jumps at frame {i}")
        prev = (i, c, w)
    return Check(
        "faces",
        float(bad.mean()),
        not bad.any(),
        "; ".join(reasons[:5]) or f"{typical} stable face(s)",
        runs(bad),
    )


def run_checks(stats: FrameStats, *, fps: float, expect_motion: bool, th: QCThresholds) -> list[Check]:
    stats.finish()
    luma = np.asarray(stats.luma)
    n = len(luma)
    checks = []

    black = np.asarray(stats.peak) < th.black_luma  # nothing in the frame is brighter than near-black
    checks.append(
        Check(
            "black_frames",
            float(black.mean()),
            not black.any(),
            f"{int(black.sum())} of {n} frames are black",
            runs(black),
        )
    )
    white = np.asarray(stats.floor) > th.white_luma
    checks.append(
        Check(
            "white_frames",
            float(white.mean()),
            not white.any(),
            f"{int(white.sum())} of {n} frames are blown out",
            runs(white),
        )
    )

    # flicker: brightness jumps far beyond the clip's usual change, not caused by black/white frames
    jumps = np.abs(np.diff(luma)) if n > 1 else np.zeros(0)
    base = float(np.median(jumps)) if len(jumps) else 0.0
    extreme = black | white
    peak = np.asarray(stats.peak)
    rel = (
        np.maximum(jumps / np.maximum(np.minimum(luma[1:], luma[:-1]), 8.0),  # relative: dark clips flicker too
                   np.abs(np.diff(peak)) / np.maximum(np.minimum(peak[1:], peak[:-1]), 16.0))  # the bright object itself
        if n > 1 else jumps
    )  # fmt: skip
    rbase = float(np.median(rel)) if len(rel) else 0.0
    spikes = (
        ((jumps > th.flicker_luma_jump + 3 * base) | (rel > th.flicker_ratio + 3 * rbase))
        & ~extreme[1:]
        & ~extreme[:-1]
    )
    flick = np.zeros(n, bool)
    flick[1:] |= spikes
    checks.append(Check("flicker", float((jumps[spikes] - base).max()) if spikes.any() else 0.0, not spikes.any(),
                        f"{int(spikes.sum())} brightness jumps (clip's median change {base:.1f})", runs(flick)))  # fmt: skip

    # Identical = almost no thumbnail pixel changed (a mean would miss a small moving object),
    # both since the previous frame and over a quarter second: at 24 fps a slowly moving object
    # (a low-contrast one on grey crossing the frame in 4 s) changes too few pixels between
    # neighbouring frames to tell from a frozen clip, but not over six of them.
    changed = np.asarray(stats.changed)
    lag, lagged = (stats.lag, np.asarray(stats.lagged)) if stats.lagged else (1, changed)
    run_len = max(2, int(round(th.frozen_run_seconds * fps)))
    frozen = np.zeros(n, bool)
    if expect_motion and len(lagged):
        # held[j]: frame j + lag equals frame j + lag - 1 and frame j; a run [s, e) of them spans
        # frames s .. e - 1 + lag
        held = (lagged < th.frozen_changed) & (changed[lag - 1 :] < th.frozen_changed)
        for s, e in runs(held):
            if e + lag - s >= run_len:
                frozen[s : e + lag] = True
    motion = float(np.mean(lagged)) if len(lagged) else 0.0
    still = expect_motion and motion < th.min_motion
    checks.append(Check("frozen", motion, not frozen.any() and not still,
                        ("no motion although the prompt asks for it; " if still else "") + f"{int(frozen.sum())} frames in identical runs",
                        runs(frozen) if frozen.any() else ([(0, n)] if still else [])))  # fmt: skip

    sharp = np.asarray(stats.sharp)
    ref = float(np.median(sharp)) if n else 0.0
    soft = (sharp < th.blur_ratio * ref) & ~extreme if ref > 1.0 else np.zeros(n, bool)
    blur_runs = [(s, e) for s, e in runs(soft) if e - s >= th.blur_min_frames]
    score = float(sharp.min() / ref) if ref > 1.0 else 1.0
    checks.append(
        Check("blur", score, not blur_runs, f"sharpest/softest {score:.2f} of the clip's median", blur_runs)
    )

    if stats.faces:
        checks.append(_check_faces(stats.boxes, n, extreme, np.asarray(stats.face_change), th))
    return checks
