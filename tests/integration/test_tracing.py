"""OpenTelemetry traces across every hop (issue #22): the request that creates a job, the job's attempt on a
worker, and the attempt's calls to every internal service are spans of one trace, whose id the Video
carries and the gateway's log prints."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id

from tests.helpers import InProcessMesh
from videomesh import tracing
from videomesh.client import VideoClient
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


def test_one_trace_from_the_request_through_every_service(tmp_path, caplog):
    exporter = InMemorySpanExporter()
    tracing.provider().add_span_processor(SimpleSpanProcessor(exporter))
    mesh = InProcessMesh(tmp_path)
    try:
        key = mesh.tenants.add("traced", "pro")
        with (
            caplog.at_level(logging.INFO, logger="videomesh.gateway"),
            VideoClient(mesh.address, api_key=key) as c,
        ):
            v = c.create(common_pb2.VideoSpec(prompt="a yellow circle moves down", seed=9))
            assert list(c.watch(v.id, timeout=120))[-1].WhichOneof("event") == "completed"
            video = c.get(v.id)
    finally:
        mesh.stop()
    assert len(video.trace_id) == 32 and int(video.trace_id, 16) and video.trace_id == v.trace_id
    assert video.trace_parent.startswith(f"00-{video.trace_id}-")
    spans = [
        s for s in exporter.get_finished_spans() if format_trace_id(s.context.trace_id) == video.trace_id
    ]
    names = {s.name for s in spans}
    for rpc in ("/videomesh.v1.VideoService/CreateVideo", "/videomesh.v1.TextEncoder/Encode",
                "/videomesh.v1.Denoiser/Denoise", "/videomesh.v1.Upscaler/Upscale",
                "/videomesh.v1.QualityCheck/Inspect"):  # fmt: skip
        assert rpc in names, (rpc, sorted(names))
    (attempt,) = [s for s in spans if s.name == "job.attempt"]
    assert attempt.attributes["videomesh.job"] == v.id and attempt.attributes["videomesh.attempt"] == 1
    (create,) = [s for s in spans if s.name == "/videomesh.v1.VideoService/CreateVideo"]
    assert attempt.parent.span_id == create.context.span_id  # the attempt is the request's child
    # each downstream's server span is a child of a client span inside the attempt
    by_id = {s.context.span_id: s for s in spans}
    for s in spans:
        if s.name.startswith("/videomesh.v1.") and "VideoService" not in s.name and s.kind.name == "SERVER":
            chain, p = [], s.parent
            while p is not None and p.span_id in by_id:
                chain.append(by_id[p.span_id].name)
                p = by_id[p.span_id].parent
            assert "job.attempt" in chain, (s.name, chain)
    assert f"trace {video.trace_id}" in caplog.text
