"""QC service settings. Thresholds come from services/qc/thresholds.toml; any of them can be
overridden per deployment ([qc] table of VIDEOMESH_CONFIG or VIDEOMESH_QC_<NAME>)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from services.qc.checks import THRESHOLDS_FILE, QCThresholds


@dataclass(frozen=True)
class QCSettings:
    host: str = "127.0.0.1"
    port: int = 0
    thresholds_file: Path = THRESHOLDS_FILE
    faces: bool = True
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

    def validate(self) -> None:
        self.thresholds()
