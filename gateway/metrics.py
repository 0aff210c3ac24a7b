"""Prometheus metrics of the gateway (served on --metrics-port when set)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class _Metrics:
    registry: CollectorRegistry
    jobs: Counter
    rejected: Counter
    queue_depth: Gauge
    stage_seconds: Histogram
    breaker_open: Gauge


def _build() -> _Metrics:
    r = CollectorRegistry()
    return _Metrics(
        registry=r,
        jobs=Counter("videomesh_jobs", "Jobs by status reached", ["status", "tier"], registry=r),
        rejected=Counter(
            "videomesh_rejected", "Submissions refused by admission control", ["reason"], registry=r
        ),
        queue_depth=Gauge("videomesh_queue_depth", "Jobs waiting in the queue", registry=r),
        stage_seconds=Histogram(
            "videomesh_stage_seconds",
            "Wall time per pipeline stage",
            ["stage"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        ),  # fmt: skip
        breaker_open=Gauge(
            "videomesh_breaker_open",
            "1 while a downstream's circuit breaker is open",
            ["service"],
            registry=r,
        ),
    )


METRICS = _build()


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics HTTP endpoint; returns the bound port."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host, registry=METRICS.registry)
    return server.server_port
