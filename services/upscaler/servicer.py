"""gRPC adapter for the upscaler: settings, then frame chunks in; frame chunks out."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from services.upscaler.interpolate import output_positions
from services.upscaler.upscaler import SpatialUpscaler, UpscalePlan, upscale_stream
from videomesh import codec
from videomesh.errors import InvalidArgument
from videomesh.inference import InferenceThread
from videomesh.v1 import upscaler_pb2, upscaler_pb2_grpc

SERVICE_NAME = upscaler_pb2.DESCRIPTOR.services_by_name["Upscaler"].full_name
# Output frames buffered into one reply chunk (each reply stays under the chunk limit).
_FRAMES_PER_REPLY = 4
MAX_FPS = 1000.0
# OpenCV's DIS optical flow (the interpolator) refuses frames smaller than this: both sides at
# least its 8-pixel patch and one side at least 12 ("width or height >= 12").
MIN_FLOW_SIDE, MIN_FLOW_LONG_SIDE = 8, 12


def _check_settings(s: upscaler_pb2.UpscaleSettings, plan: UpscalePlan) -> None:
    for name in ("input_fps", "output_fps"):
        v = getattr(s, name)
        if not (math.isfinite(v) and 0 <= v <= MAX_FPS):
            raise InvalidArgument(
                f"settings.{name} must be in 0..{MAX_FPS:g}; got {v}", field=f"settings.{name}"
            )
    plan.validate()
    w, h = plan.width, plan.height
    if min(w, h) < MIN_FLOW_SIDE or max(w, h) < MIN_FLOW_LONG_SIDE:
        positions = output_positions(plan.input_frames, plan.output_frames)
        if np.any(np.abs(positions - np.round(positions)) > 1e-9):  # some output frame lies between inputs
            raise InvalidArgument(
                f"output {w}x{h} is too small for frame interpolation (needs at least {MIN_FLOW_SIDE} pixels on "
                f"each side and {MIN_FLOW_LONG_SIDE} on one); ask for a larger size, or for as many output "
                f"frames as input frames",
                field="settings.output_width",
            )


class UpscalerServicer(upscaler_pb2_grpc.UpscalerServicer):
    """`worker`: the one thread the SR network runs on, whichever gRPC thread serves the stream
    (videomesh/inference.py); without one, the calling thread runs it."""

    def __init__(self, spatial: SpatialUpscaler, worker: InferenceThread | None = None):
        self.spatial = spatial
        self.worker = worker

    def _spatial(self, frame: np.ndarray, width: int, height: int) -> np.ndarray:
        if self.worker is None or (frame.shape[1] == width and frame.shape[0] == height):
            return self.spatial(frame, width, height)
        return self.worker.call(self.spatial, frame, width, height)

    def Upscale(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("request") != "settings":
            raise InvalidArgument("the first message must carry settings", field="settings")
        s = first.settings
        plan = UpscalePlan(
            input_frames=s.input_frames,
            input_fps=s.input_fps,
            width=s.output_width,
            height=s.output_height,
            output_frames=s.output_frames or s.input_frames,
            output_fps=s.output_fps or s.input_fps,
        )
        _check_settings(s, plan)

        def inputs() -> Iterator:
            asm = codec.FrameAssembler()
            for msg in request_iterator:
                if msg.WhichOneof("request") != "frames":
                    raise InvalidArgument("settings may only come first", field="settings")
                yield from asm.add(msg.frames)
            if asm.partial:
                raise InvalidArgument("stream ended inside a frame", field="frames")

        batch, start = [], 0
        preset = self.spatial.settings.flow_preset
        for frame in upscale_stream(plan, inputs(), self._spatial, flow_preset=preset):
            batch.append(frame)
            if len(batch) == _FRAMES_PER_REPLY:
                yield from codec.frame_chunks(np.stack(batch), start=start)
                start += len(batch)
                batch = []
        if batch:
            yield from codec.frame_chunks(np.stack(batch), start=start)


def registration(servicer: UpscalerServicer):
    return (upscaler_pb2_grpc.add_UpscalerServicer_to_server, servicer, SERVICE_NAME)
