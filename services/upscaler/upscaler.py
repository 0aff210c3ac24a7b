"""Streaming upscaler: spatial super-resolution per input frame, then flow interpolation.

Holds at most two input frames (the pair being interpolated), so memory does not grow with
the clip length. Output frames come out in order as soon as the inputs they need arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    metrics_port: int = -1  # Prometheus /metrics on host:port; -1 = off, 0 = a free port
    threads: int = 0
    # the SR net's runtime: torch | onnx (onnxruntime, CPU) | tensorrt (CUDA) | compile (torch.compile);
    # onnx/tensorrt export it once to accel_cache (default ~/.cache/videomesh/accel, videomesh/accel.py)
    runtime: str = "torch"
    accel_cache: Path | None = None
    # frame interpolation's optical flow: auto (ultrafast from 256x256 up, medium below) | ultrafast | fast |
    # medium (best on large motion; `make eval-upscaler` has the trade-off)
    flow_preset: str = "auto"

    def validate(self) -> None:
        if self.spatial not in ("auto", "bicubic", "learned"):
            raise ValueError(f"spatial must be auto, bicubic or learned; got {self.spatial!r}")
        from services.upscaler.interpolate import validate_flow_preset

        validate_flow_preset(self.flow_preset)
        from videomesh.accel import check_runtime

        check_runtime(self.runtime, "runtime")


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
        if s.runtime != "torch":
            self.net = self._accelerate(net)
        self.name = f"learned-{s.model}@{version}" + ("" if s.runtime == "torch" else f" ({s.runtime})")

    def _accelerate(self, net):
        """The SR net on settings.runtime: dynamic in batch and frame size (TensorRT's profile: 1..512
        input pixels a side, up to 4096 out at x8; larger frames run on torch)."""
        import torch

        from videomesh.accel import SR_DYNAMIC_AXES, accelerate

        s = self.settings
        if s.runtime == "tensorrt" and self.device.type != "cuda":
            raise ValueError(f"runtime=tensorrt needs CUDA; device={s.device} runs on {self.device}")
        if s.runtime == "onnx":
            self.device, self.dtype = torch.device("cpu"), torch.float32  # onnxruntime's CPU provider, fp32
            net = net.cpu()
        elif s.runtime == "tensorrt":
            self.dtype = torch.float32  # the engine takes fp32 in and out; fp16 kernels inside (fp16=True)
        example = torch.rand(1, 3, 32, 32)
        ranges = {"x": ((1, 3, 1, 1), (1, 3, 90, 160), (1, 3, 512, 512))}
        return accelerate(net, s.runtime, (example,), s.accel_cache, name=f"sr-{s.model}", input_names=["x"],
                          output_names=["y"], dynamic_axes=SR_DYNAMIC_AXES, shape_ranges=ranges,
                          fp16=s.runtime == "tensorrt", threads=s.threads)  # fmt: skip

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
    plan: UpscalePlan,
    frames: Iterator[np.ndarray],
    spatial: SpatialUpscaler | Callable[[np.ndarray, int, int], np.ndarray],
    flow_preset: str = "auto",
) -> Iterator[np.ndarray]:
    """Consume input frames in order, yield output frames in order.

    Frames already at the output size and count (a backend that generates at the requested size and
    its native rate, e.g. Wan) pass through unchanged: the same bytes, no resize, no interpolation."""
    plan.validate()
    if plan.output_frames == plan.input_frames:
        yield from _pass_through(plan, frames, spatial)
        return
    positions = output_positions(plan.input_frames, plan.output_frames)
    interp = FlowInterpolator(flow_preset=flow_preset)
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
