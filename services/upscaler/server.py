"""The upscaler's server: `build(settings)` -> (server, load, close); `python -m services.upscaler` runs it."""

from __future__ import annotations

from services.upscaler.servicer import UpscalerServicer, registration
from services.upscaler.upscaler import SpatialUpscaler, UpscalerSettings
from videomesh.inference import InferenceThread, set_torch_threads
from videomesh.serving import create_server

SETTINGS = UpscalerSettings


def build(settings: UpscalerSettings, **options):
    spatial = SpatialUpscaler(settings)
    worker = InferenceThread("upscaler", settings.threads)  # the SR net loads and runs on it
    server = create_server([registration(UpscalerServicer(spatial, worker))], host=settings.host,
                           port=settings.port, **options)  # fmt: skip

    def load():
        set_torch_threads(settings.threads)
        worker.call(spatial.load)

    return server, load, worker.close
