"""QC service settings: thresholds come from one config table ([qc] in VIDEOMESH_CONFIG)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from services.qc.checks import QCThresholds

_DEFAULT = QCThresholds()


@dataclass(frozen=True)
class QCSettings:
    host: str = "127.0.0.1"
    port: int = 0
    black_luma: float = _DEFAULT.black_luma
    white_luma: float = _DEFAULT.white_luma
    flicker_luma_jump: float = _DEFAULT.flicker_luma_jump
    frozen_diff: float = _DEFAULT.frozen_diff
    frozen_run_seconds: float = _DEFAULT.frozen_run_seconds
    min_motion: float = _DEFAULT.min_motion

    def thresholds(self) -> QCThresholds:
        return QCThresholds(**{f.name: getattr(self, f.name) for f in fields(QCThresholds)})
