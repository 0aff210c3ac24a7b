"""Prometheus metrics of the gateway, in the process's registry (videomesh.metrics: served on the
gateway's metrics_port beside every server's RPC metrics)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from videomesh.metrics import REGISTRY


@dataclass(frozen=True)
class _Metrics:
    registry: CollectorRegistry
    jobs: Counter
    rejected: Counter
    queue_depth: Gauge
    stage_seconds: Histogram
    breaker_open: Gauge
    queue_wait: Histogram
    cache_lookups: Counter
    review_backlog: Gauge
    denoiser_replicas: Gauge
    job_workers: Gauge


def _build() -> _Metrics:
    r = REGISTRY
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
        queue_wait=Histogram(
            "videomesh_queue_wait_seconds",
            "Time a job waited in the queue before an attempt started",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800),
        ),
        cache_lookups=Counter(
            "videomesh_cache_lookups", "Result-cache lookups of new jobs", ["result"], registry=r
        ),
        review_backlog=Gauge(
            "videomesh_review_backlog", "Videos waiting for a human's QC review (NEEDS_REVIEW)", registry=r
        ),
        denoiser_replicas=Gauge(
            "videomesh_denoiser_replicas",
            "Denoiser replicas SERVING, as this gateway last counted",
            registry=r,
        ),
        job_workers=Gauge(
            "videomesh_job_workers", "This gateway's job workers (sized from the denoisers)", registry=r
        ),  # fmt: skip
    )


METRICS = _build()
