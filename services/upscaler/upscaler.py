"""Streaming upscaler: spatial super-resolution per input frame, then flow interpolation.

Holds at most two input frames (the pair being interpolated), so memory does not grow with
the clip length. Output frames come out in order as soon as the inputs they need arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from services.upscaler.interpolate import FlowInterpolator, output_positions
from videomesh.errors import InvalidArgument

MAX_SIDE = 2048
MAX_OUTPUT_FRAMES = 24 * 60


@dataclass(frozen=True)
class UpscalerSettings:
    spatial: str = "bicubic"  # bicubic | learned (once weights are trained)
    weights: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 0

    def validate(self) -> None:
        if self.spatial not in ("bicubic", "learned"):
            raise ValueError(f"spatial must be bicubic or learned; got {self.spatial!r}")


@dataclass(frozen=True)
class UpscalePlan:
    input_frames: int
    input_fps: float
    width: int
    height: int
    output_frames: int
    output_fps: float

    def validate(self) -> None:
        if self.input_frames <= 0:
            raise InvalidArgument(
                f"input_frames must be positive; got {self.input_frames}", field="settings.input_frames"
            )
        if not (0 < self.width <= MAX_SIDE and 0 < self.height <= MAX_SIDE):
            raise InvalidArgument(
                f"output size must be within 1..{MAX_SIDE} per side; got {self.width}x{self.height}",
                field="settings.output_width",
            )
        if not 0 < self.output_frames <= MAX_OUTPUT_FRAMES:
            raise InvalidArgument(
                f"output_frames must be in 1..{MAX_OUTPUT_FRAMES}; got {self.output_frames}",
                field="settings.output_frames",
            )


class SpatialUpscaler:
    """Bicubic for now; the learned SR network plugs in here (same call)."""

    def __init__(self, settings: UpscalerSettings):
        self.settings = settings
        self.name = settings.spatial

    def load(self) -> None:
        if self.settings.spatial == "learned":
            raise RuntimeError("learned super-resolution weights are not trained yet; use spatial=bicubic")

    def __call__(self, frame: np.ndarray, width: int, height: int) -> np.ndarray:
        if frame.shape[1] == width and frame.shape[0] == height:
            return frame
        return cv2.resize(frame, (width, height), interpolation=cv2.INTER_CUBIC)


def upscale_stream(
    plan: UpscalePlan, frames: Iterator[np.ndarray], spatial: SpatialUpscaler
) -> Iterator[np.ndarray]:
    """Consume input frames in order, yield output frames in order."""
    plan.validate()
    positions = output_positions(plan.input_frames, plan.output_frames)
    interp = FlowInterpolator()
    j = 0
    prev: np.ndarray | None = None
    k = -1
    for k, frame in enumerate(frames):
        if k >= plan.input_frames:
            raise InvalidArgument(f"more than the announced {plan.input_frames} input frames", field="frames")
        cur = spatial(frame, plan.width, plan.height)
        # emit every output frame whose position lies in (k-1, k]
        while j < plan.output_frames and positions[j] <= k + 1e-9:
            p = positions[j]
            if prev is None or p >= k - 1e-9:
                yield cur
            else:
                yield interp.between(prev, cur, float(p - (k - 1)))
            j += 1
        prev = cur
    if k + 1 != plan.input_frames:
        raise InvalidArgument(f"got {k + 1} input frames, announced {plan.input_frames}", field="frames")
