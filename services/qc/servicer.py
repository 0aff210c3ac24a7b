"""gRPC adapter for quality checks: settings, then frame chunks in; one report out."""

from __future__ import annotations

import math

from services.qc.checks import FrameStats, QCThresholds, run_checks
from videomesh import codec
from videomesh.errors import InvalidArgument
from videomesh.v1 import common_pb2, qc_pb2, qc_pb2_grpc

SERVICE_NAME = qc_pb2.DESCRIPTOR.services_by_name["QualityCheck"].full_name
# Bounds on what a request may announce or send: no clip of the mesh is longer than the upscaler's
# MAX_OUTPUT_FRAMES (a minute at 24 fps) or faster than MAX_FPS.
MAX_FPS = 240.0
MAX_FRAMES = 24 * 60


def report_proto(checks, frames: int) -> common_pb2.QualityReport:
    return common_pb2.QualityReport(
        passed=all(c.passed for c in checks),
        frames_inspected=frames,
        checks=[
            common_pb2.CheckResult(
                name=c.name,
                score=c.score,
                passed=c.passed,
                detail=c.detail,
                frames=[common_pb2.FrameRange(start=s, end=e) for s, e in c.frames],
            )
            for c in checks
        ],
    )


class QualityCheckServicer(qc_pb2_grpc.QualityCheckServicer):
    def __init__(self, thresholds: QCThresholds | None = None, faces: bool = True):
        self.thresholds = thresholds or QCThresholds.load()
        self.faces = faces

    def Inspect(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("request") != "settings":
            raise InvalidArgument("the first message must carry settings", field="settings")
        s = first.settings
        if not (math.isfinite(s.fps) and 0 < s.fps <= MAX_FPS):
            raise InvalidArgument(
                f"settings.fps must be in (0, {MAX_FPS:g}]; got {s.fps}", field="settings.fps"
            )
        if not 0 <= s.total_frames <= MAX_FRAMES:
            raise InvalidArgument(
                f"settings.total_frames must be in 0..{MAX_FRAMES} (0 = not announced); got {s.total_frames}",
                field="settings.total_frames",
            )
        stats = FrameStats(self.thresholds, fps=s.fps, faces=self.faces)
        asm = codec.FrameAssembler()
        for msg in request_iterator:
            if msg.WhichOneof("request") != "frames":
                raise InvalidArgument("settings may only come first", field="settings")
            for frame in asm.add(msg.frames):
                if len(stats.luma) >= MAX_FRAMES:
                    raise InvalidArgument(f"more than {MAX_FRAMES} frames", field="frames")
                stats.add(frame)
        if asm.partial:
            raise InvalidArgument("stream ended inside a frame", field="frames")
        n = len(stats.luma)
        if n == 0:
            raise InvalidArgument("no frames to inspect", field="frames")
        if s.total_frames and n != s.total_frames:
            raise InvalidArgument(f"announced {s.total_frames} frames, got {n}", field="frames")
        checks = run_checks(stats, fps=s.fps, expect_motion=s.expect_motion, th=self.thresholds)
        return report_proto(checks, n)


def registration(servicer: QualityCheckServicer):
    return (qc_pb2_grpc.add_QualityCheckServicer_to_server, servicer, SERVICE_NAME)
