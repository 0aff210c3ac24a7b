"""QC service settings. Thresholds come from services/qc/thresholds.toml; any of them can be
overridden per deployment ([qc] table of VIDEOMESH_CONFIG or VIDEOMESH_QC_<NAME>)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import cv2

from services.qc.checks import THRESHOLDS_FILE, QCThresholds
from videomesh.inference import available_cores


def resolve_threads(threads: int) -> int:
    """OpenCV threads for QC: `threads`, or every core this process may use when 0."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = every available core); got {threads}")
    return threads or available_cores()


def set_opencv_threads(threads: int = 0) -> int:
    """Size OpenCV's pool (process-wide) from `threads` (0 = available cores); returns the count.
    The checks run OpenCV on small frames; two threads took the calibration suite from 269 to 456
    frames/s on a 2-core machine (`python -m services.qc.calibrate --threads 1|2`)."""
    n = resolve_threads(threads)
    cv2.setNumThreads(n)
    return n


@dataclass(frozen=True)
class QCSettings:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = -1  # Prometheus /metrics on host:port; -1 = off, 0 = a free port
    thresholds_file: Path = THRESHOLDS_FILE
    faces: bool = True
    threads: int = 0  # OpenCV threads; 0 = every core this process may use (affinity, cgroup quota)
    black_luma: float | None = None
    white_luma: float | None = None
    flicker_luma_jump: float | None = None
    frozen_diff: float | None = None
    frozen_run_seconds: float | None = None
    min_motion: float | None = None
    blur_ratio: float | None = None
    face_jump: float | None = None

    def thresholds(self) -> QCThresholds:
        names = {f.name for f in fields(QCThresholds)}
        return QCThresholds.load(
            self.thresholds_file, **{k: getattr(self, k) for k in names if hasattr(self, k)}
        )

    def opencv_threads(self) -> int:
        return resolve_threads(self.threads)

    def apply_threads(self) -> int:
        """Set OpenCV's thread count for this process from the settings; returns it."""
        return set_opencv_threads(self.threads)

    def validate(self) -> None:
        resolve_threads(self.threads)
        self.thresholds()
