"""Prometheus metrics of every service: one registry per process, served on the service's metrics_port.

Every server counts its RPCs by method and status code, times them, and gauges the calls in flight
(`MetricsInterceptor`, outermost on every server, so refusals and malformed requests count too; health
checks are left out).
Services add their own: the gateway's jobs, queue, stages, breakers and cache (gateway/metrics.py),
the denoiser's step time and batch sizes, and GPU memory wherever CUDA is present.
"""

from __future__ import annotations

import collections
import threading
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

RPC_REQUESTS = Counter(
    "videomesh_rpc_requests", "RPCs answered, by method and status code", ["service", "method", "code"],
    registry=REGISTRY,
)  # fmt: skip
RPC_DURATION = Histogram(
    "videomesh_rpc_duration_seconds", "Wall time of an RPC, from its arrival to its last reply",
    ["service", "method"], registry=REGISTRY, buckets=LATENCY_BUCKETS,
)  # fmt: skip
RPC_IN_FLIGHT = Gauge("videomesh_rpc_in_flight", "RPCs being served now", ["service"], registry=REGISTRY)

DENOISER_STEP = Histogram(
    "videomesh_denoiser_step_seconds", "Wall time of one denoising step of one batch", registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
DENOISER_BATCH = Histogram(
    "videomesh_denoiser_batch_size", "Requests stepped together in one batch", registry=REGISTRY,
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
)  # fmt: skip
GPU_MEMORY = Gauge(
    "videomesh_gpu_memory_bytes", "CUDA memory allocated by this process", ["device"], registry=REGISTRY
)


def _code_name(code) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


class _Observed:
    __slots__ = ("service", "method", "start")

    def __init__(self, service: str, method: str):
        self.service, self.method, self.start = service, method, time.perf_counter()
        RPC_IN_FLIGHT.labels(service).inc()

    def done(self, context, failed: bool = False) -> None:
        RPC_IN_FLIGHT.labels(self.service).dec()
        RPC_DURATION.labels(self.service, self.method).observe(time.perf_counter() - self.start)
        code = context.code() if hasattr(context, "code") else None
        if code is None:
            if failed:
                code = grpc.StatusCode.UNKNOWN
            elif not context.is_active() and failed is None:
                code = grpc.StatusCode.CANCELLED
        RPC_REQUESTS.labels(self.service, self.method, _code_name(code)).inc()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and gauges every RPC of a server (label `service`: encoder, denoiser, …)."""

    def __init__(self, service: str):
        self.service = service
        # this server's RPCs by method (the registry's counters are per process, labelled by service only)
        self.calls: collections.Counter[str] = collections.Counter()

    def _unary(self, fn, method):
        def handler(request, context):
            self.calls[method] += 1
            obs = _Observed(self.service, method)
            failed = True
            try:
                reply = fn(request, context)
                failed = False
                return reply
            finally:
                obs.done(context, failed)

        return handler

    def _stream(self, fn, method):
        def handler(request, context):
            self.calls[method] += 1
            obs = _Observed(self.service, method)
            failed = None  # None: the client may have gone away before the end
            try:
                yield from fn(request, context)
                failed = False
            except GeneratorExit:
                failed = None
                raise
            except BaseException:
                failed = True
                raise
            finally:
                obs.done(context, failed)

        return handler

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            # probes and the channels' health watches (one open Watch per client channel and replica) would
            # drown the RPC rates and keep the in-flight gauge up for good: not counted
            return handler
        method = handler_call_details.method.rpartition("/")[2]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, method))
        return handler


_gpu_watch = threading.Lock()
_gpu_started = False


def watch_gpu_memory() -> None:
    """GPU memory per CUDA device, read at each scrape (nothing where CUDA is absent)."""
    global _gpu_started
    with _gpu_watch:
        if _gpu_started:
            return
        _gpu_started = True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if not torch.cuda.is_available():
        return
    for i in range(torch.cuda.device_count()):
        GPU_MEMORY.labels(f"cuda:{i}").set_function(lambda i=i: torch.cuda.memory_allocated(i))


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics HTTP endpoint of this process's registry; returns the bound port."""
    from prometheus_client import start_http_server

    watch_gpu_memory()
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server.server_port


def exported_names() -> set[str]:
    """Every sample name the registry exports (counters with `_total`, histograms with their parts),
    labelled or not: what dashboards and alert rules may refer to."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}  # fmt: skip
    out = set()
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - describe() of each collector
        for metric in collector.describe():
            out.update(metric.name + s for s in suffixes.get(metric.type, ("",)))
    return out
