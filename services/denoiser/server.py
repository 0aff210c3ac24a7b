"""The denoiser's server: `build(settings)` -> (server, load, close); `python -m services.denoiser` runs it."""

from __future__ import annotations

from services.denoiser.engine import WAN, DenoiserSettings, load_backend
from services.denoiser.executors import make_executor
from services.denoiser.servicer import DenoiserServicer, registration
from videomesh.codec import MAX_MESSAGE_BYTES, TEXT_MESSAGE_BYTES
from videomesh.inference import InferenceThread, set_torch_threads
from videomesh.serving import create_server

SETTINGS = DenoiserSettings


def message_limit(settings: DenoiserSettings) -> int:
    """Its own setting where it has one, else raised for wan2.2 (a DenoiseRequest carries two 512 x 4096
    bf16 text states, 8 MiB; see codec.TEXT_MESSAGE_BYTES)."""
    own = getattr(settings, "max_message_bytes", 0)
    return own or (TEXT_MESSAGE_BYTES if settings.model == WAN else MAX_MESSAGE_BYTES)


def build(settings: DenoiserSettings, **options):
    servicer = DenoiserServicer()  # the backend and executor are attached once loaded
    server = create_server([registration(servicer)], host=settings.host, port=settings.port,
                           max_message_bytes=message_limit(settings), **options)  # fmt: skip
    server.servicer = servicer  # tests read servicer.active

    # the model loads on the thread that will run it (the executor's scheduler): one torch thread pool
    worker = InferenceThread("denoiser", settings.threads)

    def load():
        set_torch_threads(settings.threads)
        # a Ray driver of Wan loads no expert (the shards do): it starts, steps and decodes requests
        ray_driver = settings.executor == "ray" and settings.model == WAN
        backend = worker.call(load_backend, settings, experts=() if ray_driver else None)
        executor = make_executor(backend, settings, worker)
        executor.start()
        servicer.attach(backend, executor)

    def close():
        servicer.close()
        worker.close()

    return server, load, close
