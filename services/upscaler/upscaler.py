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
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_OUTPUT_FRAMES = 24 * 60


@dataclass(frozen=True)
class UpscalerSettings:
    # the learned network with its anti-ringing clamp beats bicubic on world frames and photos
    # with less frame-to-frame change than bicubic (`make eval-upscaler`, MODEL_CARD.md)
    spatial: str = "auto"  # auto (learned when its weights are installed, else bicubic) | learned | bicubic
    model: str = "x8"
    weights: Path | None = None  # default services/upscaler/weights/<model>.safetensors
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 0

    def validate(self) -> None:
        if self.spatial not in ("auto", "bicubic", "learned"):
            raise ValueError(f"spatial must be auto, bicubic or learned; got {self.spatial!r}")


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
    """Learned residual SR (services/upscaler/model.py) when its weights are installed, else bicubic.

    The network works at its trained factor; any other target size is reached from its
    output by one more resize (area when shrinking, bicubic when growing).
    """

    def __init__(self, settings: UpscalerSettings):
        self.settings = settings
        self.name = "bicubic"
        self.net = None
        self.device = None
        self.dtype = None

    def load(self) -> None:
        s = self.settings
        if s.spatial == "bicubic":
            return
        import torch

        from services.upscaler.model import SR_MODELS, ResidualESPCN
        from videomesh.weights import UNTRAINED, load_into

        path = s.weights or WEIGHTS_DIR / f"{s.model}.safetensors"
        net = ResidualESPCN(SR_MODELS[s.model]).eval()
        version = load_into(net, path)
        if version == UNTRAINED:
            if s.spatial == "learned":
                raise RuntimeError(
                    f"no super-resolution weights at {path}; run `make train-upscaler` or use spatial=bicubic"
                )
            return
        cuda = torch.cuda.is_available() and s.device in ("auto", "cuda")
        self.device = torch.device("cuda" if cuda else "cpu")
        from videomesh.hardware import cpu_bf16_is_fast

        # bf16 on the CPU only with AMX-BF16; emulated bf16 is many times slower than fp32
        self.dtype = torch.float16 if cuda else (torch.bfloat16 if cpu_bf16_is_fast() else torch.float32)
        self.net = net.to(self.device)
        self.name = f"learned-{s.model}@{version}"

    def __call__(self, frame: np.ndarray, width: int, height: int) -> np.ndarray:
        if frame.shape[1] == width and frame.shape[0] == height:
            return frame
        if self.net is None or width < frame.shape[1] or height < frame.shape[0]:
            return cv2.resize(frame, (width, height), interpolation=cv2.INTER_CUBIC)
        import torch

        if not frame.flags.writeable:  # frames decoded from a message are read-only views
            frame = frame.copy()
        low = self.dtype != torch.float32  # autocast only for bf16/fp16; fp32 runs as it is
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=low):
            x = (
                torch.from_numpy(frame).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            )  # (H, W, C) -> (1, C, H, W)
            y = self.net(x)[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        if y.shape[1] != width or y.shape[0] != height:
            shrink = y.shape[1] > width
            y = cv2.resize(y, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        return y


def upscale_stream(
    plan: UpscalePlan, frames: Iterator[np.ndarray], spatial: SpatialUpscaler
) -> Iterator[np.ndarray]:
    """Consume input frames in order, yield output frames in order.

    Frames already at the output size and count (a backend that generates at the requested size and
    its native rate, e.g. Wan) pass through unchanged: the same bytes, no resize, no interpolation."""
    plan.validate()
    if plan.output_frames == plan.input_frames:
        yield from _pass_through(plan, frames, spatial)
        return
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


def _pass_through(
    plan: UpscalePlan, frames: Iterator[np.ndarray], spatial: SpatialUpscaler
) -> Iterator[np.ndarray]:
    k = -1
    for k, frame in enumerate(frames):
        if k >= plan.input_frames:
            raise InvalidArgument(f"more than the announced {plan.input_frames} input frames", field="frames")
        same = frame.shape[1] == plan.width and frame.shape[0] == plan.height
        yield frame if same else spatial(frame, plan.width, plan.height)
    if k + 1 != plan.input_frames:
        raise InvalidArgument(f"got {k + 1} input frames, announced {plan.input_frames}", field="frames")
