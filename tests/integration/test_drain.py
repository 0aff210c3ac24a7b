"""Graceful drain of the gateway (issue #22): on stop (what SIGTERM runs) health says NOT_SERVING at once,
no queued job is started, the job in flight finishes within the grace, and the queued ones run after the
next start: nothing lost, nothing run twice."""

from __future__ import annotations

import threading
import time

import pytest
from grpc_health.v1 import health_pb2

from tests.helpers import InProcessMesh
from videomesh.client import VideoClient
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


def test_stop_drains_the_job_in_flight_and_starts_no_queued_one(tmp_path):
    mesh = InProcessMesh(tmp_path, gateway={"workers": 1})
    try:
        key = mesh.tenants.add("drain", "pro")
        with VideoClient(mesh.address, api_key=key) as c:
            ids = [c.create(common_pb2.VideoSpec(prompt="a red ball moves right", num_steps=60, seed=i + 1)).id
                   for i in range(3)]  # fmt: skip
            deadline = time.monotonic() + 60
            while c.get(ids[0]).status != common_pb2.RUNNING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get(ids[0]).status == common_pb2.RUNNING
        server, gw = mesh.servers["gateway"], mesh.gateway
        t0 = time.monotonic()
        stopper = threading.Thread(target=server.stop, args=(60.0,))
        stopper.start()
        time.sleep(0.2)
        # (the port refuses new calls once stop begins: the status a probe already watching hears)
        said = server.health.Check(health_pb2.HealthCheckRequest(service=""), None).status
        assert said == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join(90)
        took = time.monotonic() - t0
        assert not stopper.is_alive()
        assert took < 60, f"stop waited out the whole grace ({took:.1f} s) though the job had finished"
        first, *queued = (gw.store.load(i).video for i in ids)
        assert first.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW), first.status
        assert [v.status for v in queued] == [common_pb2.QUEUED] * 2  # never started during the drain
        assert all(v.attempt == 0 for v in queued), [v.attempt for v in queued]
        print(f"\ndrain: the job in flight finished and stop returned after {took:.2f} s (grace 60 s)")
        mesh.restart_gateway()  # the next start runs what was queued
        with VideoClient(mesh.address, api_key=key) as c:
            ends = [list(c.watch(i, timeout=180))[-1].WhichOneof("event") for i in ids[1:]]
            assert ends == ["completed", "completed"]
            assert all(c.get(i).attempt == 1 for i in ids)
    finally:
        mesh.stop()
