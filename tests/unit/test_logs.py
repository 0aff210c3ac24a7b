"""Structured JSON logs (issue #22): one object per line with service, job, tenant and trace ids."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time

import pytest

from videomesh import tracing
from videomesh.logs import handler, job_context


def test_a_json_line_carries_the_job_tenant_and_trace_ids():
    out = io.StringIO()
    log = logging.getLogger("videomesh.test-json")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler("gateway", "json", out))
    try:
        with job_context("vid_123", "acme"), tracing.job_span("job.attempt", "") as span:
            log.info("job %s attempt %d started", "vid_123", 1)
        log.warning("outside any job")
    finally:
        log.handlers.clear()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "job vid_123 attempt 1 started" and first["level"] == "INFO"
    assert first["service"] == "gateway" and first["logger"] == "videomesh.test-json"
    assert first["job"] == "vid_123" and first["tenant"] == "acme"
    assert first["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert second["job"] == "" and second["trace_id"] == "" and second["level"] == "WARNING"
    assert "time" in first


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text or json"):
        handler("qc", "yaml")


def test_a_service_started_with_log_format_json_writes_only_json_lines(tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "videomesh.launch", "qc", "--log-format", "json",
                             "--port-file", str(port_file)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any("SERVING" in rec["message"] for rec in lines), err
    assert all(rec["service"] == "qc" for rec in lines)
