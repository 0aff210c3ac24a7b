"""Logging of every service: text lines (default) or structured JSON, one object per line.

`VIDEOMESH_LOG_FORMAT=json` (or `--log-format json`) writes each record as one JSON object (python-json-logger)
with `time`, `level`, `service`, `logger`, `message`, and, where known, `job`, `tenant` and `trace_id`:
the ids a log pipeline (Loki, Elasticsearch, Cloud Logging) indexes. The trace id is the current
OpenTelemetry span's; job and tenant come from `job_context()`, which the gateway's worker sets while
it runs an attempt.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from contextlib import contextmanager

from videomesh.tracing import trace_id_now

FORMAT_ENV = "VIDEOMESH_LOG_FORMAT"
_job: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("videomesh_job", default=None)


@contextmanager
def job_context(job: str, tenant: str):
    """Records logged in this block (this thread) carry `job` and `tenant`."""
    token = _job.set((job, tenant))
    try:
        yield
    finally:
        _job.reset(token)


class ContextFilter(logging.Filter):
    """Adds service, job, tenant and trace_id to every record (empty where unknown)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        job = _job.get()
        record.job, record.tenant = job if job else ("", "")
        record.trace_id = trace_id_now()  # "" outside a span
        return True


def configure(service: str, level: str = "INFO", fmt: str | None = None, stream=None) -> None:
    """Root logging for a service process: text (the default) or json."""
    h = handler(service, fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(h)
    root.setLevel(level.upper())


def handler(service: str, fmt: str | None = None, stream=None) -> logging.Handler:
    """A stream handler writing `fmt` (text | json; default $VIDEOMESH_LOG_FORMAT, else text)."""
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "text").lower()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter(service))
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(service)s %(name)s %(message)s %(job)s %(tenant)s %(trace_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    else:
        raise ValueError(f"{FORMAT_ENV} / --log-format: {fmt!r} is not text or json")
    return handler
