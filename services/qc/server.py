"""The quality gate's server: `build(settings)` -> (server, load, close); `python -m services.qc` runs it."""

from __future__ import annotations

from services.qc.servicer import QualityCheckServicer, registration
from services.qc.settings import QCSettings
from videomesh.serving import create_server

SETTINGS = QCSettings


def build(settings: QCSettings, **options):
    settings.apply_threads()  # OpenCV's threads: every usable core unless the settings say
    servicer = QualityCheckServicer(settings.thresholds(), faces=settings.faces)
    server = create_server([registration(servicer)], host=settings.host, port=settings.port, **options)
    return server, lambda: None, lambda: None
