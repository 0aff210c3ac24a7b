"""OpenTelemetry traces across every hop (opentelemetry-sdk + opentelemetry-instrumentation-grpc).

Every server gets the instrumentation's server interceptor (a span per RPC, its parent taken from the
caller's `traceparent` metadata); the gateway's channels to the internal services get a client
interceptor of ours (`traced`: a client span per call, `traceparent` sent), so a job's Encode, Denoise,
Upscale and Inspect calls are spans of one trace. A job runs
later than the request that created it, on a worker (maybe of another replica): the request's trace id
and traceparent are kept in the job's Video (`trace_id`, `trace_parent`), and each attempt is a span
`job.attempt` whose parent is that request's span.

Exporting is off by default: spans are made (so ids exist and travel) and dropped. The standard variables
turn it on: `OTEL_TRACES_EXPORTER=otlp` (or `console`), `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_SERVICE_NAME` (default `videomesh-<service>`), `OTEL_TRACES_SAMPLER` / `_ARG` (read by the SDK).
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from videomesh.interceptors import ClientInterceptor, with_metadata

log = logging.getLogger("videomesh.tracing")

_lock = threading.Lock()
_provider = None
_PROPAGATOR = TraceContextTextMapPropagator()
HEALTH = "grpc.health.v1.Health"


def provider():
    """This process's SDK TracerProvider (made and installed once; exporters per the OTEL_* variables)."""
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        name = os.environ.get("OTEL_SERVICE_NAME") or f"videomesh-{_service or 'process'}"
        p = TracerProvider(resource=Resource.create({"service.name": name}))
        exporters = [
            e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if e.strip()
        ]
        for e in exporters:
            if e == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                p.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            elif e == "console":
                p.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            elif e != "none":
                log.warning(
                    "OTEL_TRACES_EXPORTER=%s: not one of otlp, console, none; spans are not exported", e
                )
        if exporters and exporters != ["none"]:
            log.info("traces exported by %s as %s", ",".join(exporters), name)
        trace.set_tracer_provider(p)
        _provider = p
        return p


_service = ""


def setup(service: str) -> None:
    """Name this process's traces after its service (the first call wins) and install the provider."""
    global _service
    if not _service:
        _service = service
    provider()


def server_interceptor():
    """The instrumentation's server interceptor (health probes are not traced: one span per probe is noise)."""
    from opentelemetry.instrumentation.grpc import filters
    from opentelemetry.instrumentation.grpc import server_interceptor as make

    return make(tracer_provider=provider(), filter_=filters.negate(filters.service_name(HEALTH)))


class _ClientSpans(ClientInterceptor):
    """A client span per call, its context sent as `traceparent` metadata. A plain grpc client interceptor
    (not the instrumentation's own channel wrapper, which turns a server-streaming call into a bare
    generator: the job's control could no longer cancel a Denoise in flight). The span ends when the call
    does (`add_callback`), and is never made current: an attempt's calls are siblings under it."""

    def __init__(self):
        self.tracer = provider().get_tracer("videomesh.client")

    def _start(self, d: grpc.ClientCallDetails):
        method = d.method.decode() if isinstance(d.method, bytes) else d.method
        if method.startswith(f"/{HEALTH}/"):
            return None, d
        span = self.tracer.start_span(method, kind=trace.SpanKind.CLIENT,
                                      attributes={"rpc.system": "grpc", "rpc.method": method})  # fmt: skip
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return span, with_metadata(d, carrier.items())

    @staticmethod
    def _end_with(span, call):
        if span is None:
            return call

        def done():
            code = call.code() if hasattr(call, "code") else None
            if code is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()

        if not call.add_callback(done):  # already over
            done()
        return call

    def call(self, continuation, details, request):
        span, details = self._start(details)
        return self._end_with(span, continuation(details, request))


def traced(channel):
    """`channel`, each call a client span of the current trace (the callee's span is its child)."""
    return grpc.intercept_channel(channel, _ClientSpans())


def current_ids() -> tuple[str, str]:
    """(trace id, W3C traceparent) of the span running now, or ("", "") outside a traced call."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return trace.format_trace_id(ctx.trace_id), carrier.get("traceparent", "")


@contextmanager
def job_span(name: str, trace_parent: str, **attributes):
    """A span for work done for a job outside the request that created it (an attempt on a worker), a child
    of that request's span; current while the block runs, so the calls it makes carry it."""
    parent = _PROPAGATOR.extract({"traceparent": trace_parent}) if trace_parent else otel_context.Context()
    tracer = provider().get_tracer("videomesh.gateway")
    with tracer.start_as_current_span(name, context=parent, attributes=attributes) as span:
        yield span


def trace_id_now() -> str:
    ctx = trace.get_current_span().get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else ""
