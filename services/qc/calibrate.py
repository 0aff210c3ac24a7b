"""`make eval-qc`: precision and recall of every quality check on a labelled suite.

The suite is generated here, deterministically: clean clips (moving shapes from the world
generator, some drifting slowly; pan/zoom clips over the face in scikit-image's `astronaut` photograph) and copies
with one known defect each — inserted black frames, brightness flicker, a frozen run, a
blurred run, a warped or a duplicated face. A check is right on a clip when it fails
exactly the clips carrying its defect. Also prints throughput in frames per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import cv2
import numpy as np

from services.qc.checks import FrameStats, QCThresholds, run_checks
from services.qc.settings import set_opencv_threads
from videomesh.world import ClipSpec, render_clip

FPS = 24.0
T = 48
SIZE = 256
DEFECTS = {"black": "black_frames", "flicker": "flicker", "frozen": "frozen", "blur": "blur", "face_warp": "faces",
           "face_dup": "faces"}  # fmt: skip
TARGET = 0.95


@dataclass
class Clip:
    name: str
    frames: np.ndarray
    expect_motion: bool
    defect: str | None = None


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def face_clip(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A slow pan and zoom over the astronaut's face."""
    h, w = img.shape[:2]
    cx0, cy0 = 225 + rng.uniform(-30, 30), 140 + rng.uniform(-20, 20)
    dx, dy = rng.uniform(-40, 40), rng.uniform(-25, 25)
    z0, z1 = rng.uniform(300, 360), rng.uniform(240, 300)
    frames = []
    for i in range(T):
        a = i / (T - 1)
        cx, cy, side = cx0 + a * dx, cy0 + a * dy, z0 + a * (z1 - z0)
        x0 = int(np.clip(cx - side / 2, 0, w - side))
        y0 = int(np.clip(cy - side / 2, 0, h - side))
        crop = img[y0 : y0 + int(side), x0 : x0 + int(side)]
        frames.append(cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def world_clip(rng: np.random.Generator, motion: str) -> np.ndarray:
    colors = ("red", "orange", "yellow", "green", "cyan", "blue", "purple")
    spec = ClipSpec(background=str(rng.choice(["black", "white", "gray", "navy"])), shape=str(rng.choice(["circle", "square", "triangle"])),
                    color=str(rng.choice(colors)), size=str(rng.choice(["small", "large"])), motion=motion)  # fmt: skip
    return render_clip(spec, num_frames=T, height=SIZE, width=SIZE, rng=rng, texture=bool(rng.random() < 0.5))


def _face_box(frame: np.ndarray) -> tuple[int, int, int, int] | None:
    from services.qc.checks import face_detector

    g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    f = face_detector().detectMultiScale(g, 1.1, 5, minSize=(24, 24))
    return tuple(max(f, key=lambda r: r[2] * r[3])) if len(f) else None


def corrupt(frames: np.ndarray, defect: str, rng: np.random.Generator) -> np.ndarray:
    out = frames.copy()
    k = int(rng.integers(8, T - 16))
    if defect == "black":
        n = int(rng.integers(1, 4))
        out[k : k + n] = (out[k : k + n] * 0.03).astype(np.uint8)
    elif defect == "flicker":
        for j in (k, k + int(rng.integers(3, 8))):
            gain = rng.choice([1.6, 0.5])
            out[j] = np.clip(out[j].astype(np.float32) * gain, 0, 255).astype(np.uint8)
    elif defect == "frozen":  # 32 identical frames: 1.3 s at 24 fps
        k0 = int(rng.integers(0, T - 32))
        out[k0 : k0 + 32] = out[k0]
    elif defect == "blur":
        for j in range(k, k + 6):
            out[j] = cv2.GaussianBlur(out[j], (0, 0), 4.0)
    elif defect in ("face_warp", "face_dup"):
        for j in range(k, k + 3):
            box = _face_box(out[j])
            if box is None:
                continue
            x, y, w, h = box
            if defect == "face_warp":  # scramble the face: a strong random displacement field
                dxy = cv2.GaussianBlur(rng.normal(0, 1, (h, w, 2)).astype(np.float32), (0, 0), 3) * 60
                gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
                region = out[j, y : y + h, x : x + w]
                out[j, y : y + h, x : x + w] = cv2.remap(region, gx + dxy[..., 0], gy + dxy[..., 1], cv2.INTER_LINEAR,
                                                         borderMode=cv2.BORDER_REFLECT)  # fmt: skip
            else:  # a second, smaller copy of the face beside the first, not covering it
                face = cv2.resize(
                    out[j, y : y + h, x : x + w], (int(w * 0.7), int(h * 0.7)), interpolation=cv2.INTER_AREA
                )
                fh, fw = face.shape[:2]
                nx = x + w + 4 if x + w / 2 < SIZE / 2 else x - fw - 4
                nx = int(np.clip(nx, 0, SIZE - fw))
                ny = int(np.clip(y + h // 4, 0, SIZE - fh))
                out[j, ny : ny + fh, nx : nx + fw] = face
    return out


def suite(seed: int = 0, per_kind: int = 12) -> list[Clip]:
    rng = np.random.default_rng(seed)
    img = _astronaut()
    clips = []
    motions = ["left", "right", "up", "down"]
    for i in range(per_kind):
        base_world = world_clip(rng, motions[i % 4])
        base_face = face_clip(rng, img)
        clips.append(Clip(f"world{i}", base_world, True))
        clips.append(Clip(f"face{i}", base_face, True))
        for d in ("black", "flicker", "frozen", "blur"):
            clips.append(Clip(f"world{i}-{d}", corrupt(base_world, d, rng), True, d))
            clips.append(Clip(f"face{i}-{d}", corrupt(base_face, d, rng), True, d))
        for d in ("face_warp", "face_dup"):
            clips.append(Clip(f"face{i}-{d}", corrupt(base_face, d, rng), True, d))
    still = render_clip(
        ClipSpec("gray", "square", "red", "large", "still"), num_frames=T, height=SIZE, width=SIZE, rng=rng
    )
    clips.append(Clip("world-still-ok", still, False))  # a still prompt: no motion is right
    clips.append(Clip("world-still-frozen", still, True, "frozen"))  # a motion prompt: frozen
    # slow drifts (across the frame in 8 s, low contrast in grey): the generated clips' pace,
    # which consecutive 24 fps frames alone mistook for frozen
    for i, (bg, color) in enumerate(
        (("gray", "green"), ("gray", "cyan"), ("navy", "blue"), ("white", "yellow"))
    ):
        slow = render_clip(ClipSpec(bg, "circle", color, "small", motions[i]), num_frames=4 * T, height=SIZE,
                           width=SIZE, rng=rng)  # fmt: skip
        clips.append(Clip(f"world-slow{i}", slow, True))
        clips.append(Clip(f"world-slow{i}-frozen", corrupt(slow, "frozen", rng), True, "frozen"))
    return clips


def evaluate(clips: list[Clip], th: QCThresholds) -> tuple[dict, float, list]:
    checks = sorted(set(DEFECTS.values()))
    tp = dict.fromkeys(checks, 0)
    fp = dict.fromkeys(checks, 0)
    fn = dict.fromkeys(checks, 0)
    errors = []
    frames = 0
    t0 = time.perf_counter()
    for clip in clips:
        stats = FrameStats(th, fps=FPS)
        for f in clip.frames:
            stats.add(f)
        frames += len(clip.frames)
        failed = {
            c.name
            for c in run_checks(stats, fps=FPS, expect_motion=clip.expect_motion, th=th)
            if not c.passed
        }
        want = {DEFECTS[clip.defect]} if clip.defect else set()
        for c in checks:
            if c in failed and c in want:
                tp[c] += 1
            elif c in failed:
                fp[c] += 1
                errors.append((clip.name, c, "false alarm"))
            elif c in want:
                fn[c] += 1
                errors.append((clip.name, c, "missed"))
    fps = frames / (time.perf_counter() - t0)
    table = {c: {"precision": tp[c] / max(1, tp[c] + fp[c]), "recall": tp[c] / max(1, tp[c] + fn[c]), "n": tp[c] + fn[c]}
             for c in checks}  # fmt: skip
    return table, fps, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval-qc", description=__doc__.splitlines()[0])
    p.add_argument("--per-kind", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=0, help="OpenCV threads; 0 = every available core, as the service"
    )
    a = p.parse_args(argv)
    threads = set_opencv_threads(a.threads)
    th = QCThresholds.load()
    clips = suite(a.seed, a.per_kind)
    table, fps, errors = evaluate(clips, th)
    print(f"{len(clips)} clips of {T} frames at {SIZE}x{SIZE}")
    print(f"{'check':<14} {'positives':>9} {'precision':>10} {'recall':>8}")
    ok = True
    for c, r in table.items():
        print(f"{c:<14} {r['n']:>9} {r['precision']:>10.1%} {r['recall']:>8.1%}")
        ok &= r["precision"] >= TARGET and r["recall"] >= TARGET
    print(f"throughput: {fps:.0f} frames/s with {threads} OpenCV thread(s) (all checks, faces included)")
    for e in errors[:20]:
        print("  ", *e)
    print(
        f"targets (precision and recall ≥ {TARGET:.0%}, ≥ 500 frames/s): {'MET' if ok and fps >= 500 else 'NOT MET'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
