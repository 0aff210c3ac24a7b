"""The text encoder's server: `build(settings)` -> (server, load, close); `python -m services.encoder` runs it."""

from __future__ import annotations

from services.encoder.encoder import EncoderSettings, TextEncoding
from services.encoder.servicer import TextEncoderServicer, registration
from videomesh.inference import set_torch_threads
from videomesh.serving import create_server

SETTINGS = EncoderSettings


def build(settings: EncoderSettings, **options):
    """`options`: create_server's keywords the launcher adds (service name, mesh credential, TLS)."""
    domain = TextEncoding(settings)
    servicer = TextEncoderServicer(domain)
    server = create_server([registration(servicer)], host=settings.host, port=settings.port,
                           max_message_bytes=settings.message_limit, **options)  # fmt: skip
    server.servicer = servicer

    def load():
        set_torch_threads(settings.threads)
        domain.load()

    return server, load, domain.close
