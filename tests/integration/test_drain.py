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


def test_sigterm_drains_the_gateway_process_and_a_server_ended_stream_keeps_its_job(tmp_path):
    """The path a container's SIGTERM takes (launch.serve): the process lives until the job in flight has
    finished, exits 0, and a job whose GenerateVideo stream the server ended (queued, never started) is
    left QUEUED for the next start, not cancelled."""
    import os
    import signal
    import subprocess
    import sys

    from gateway.sqlite_store import SQLiteJobStore
    from gateway.tenants import TenantDirectory
    from tests.helpers import start_downstreams

    servers, stops = start_downstreams()
    data = tmp_path / "data"
    key = TenantDirectory(data / "tenants.json").add("drain", "pro")
    port_file = tmp_path / "port"
    env = {**os.environ, "VIDEOMESH_GRACE_SECONDS": "8", "VIDEOMESH_GATEWAY_WORKERS": "1",
           "VIDEOMESH_GATEWAY_SIZES": "64x64", "VIDEOMESH_GATEWAY_DEFAULT_SIZE": "64x64",
           "VIDEOMESH_GATEWAY_FPS_CHOICES": "8", "VIDEOMESH_GATEWAY_DEFAULT_FPS": "8"}  # fmt: skip
    args = [
        sys.executable,
        "-m",
        "videomesh.launch",
        "gateway",
        "--port-file",
        str(port_file),
        "--data-dir",
        str(data),
    ]
    for n, srv in servers.items():
        args += [f"--{n}", srv.address]
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        with VideoClient(address, api_key=key) as c:
            c.wait_ready(30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    c.get("vid_none")
                except Exception as err:  # noqa: BLE001 - NOT_FOUND once it serves; UNAVAILABLE before
                    if "NOT_FOUND" in str(err):
                        break
                time.sleep(0.1)
            running = c.create(common_pb2.VideoSpec(prompt="a red ball moves right", num_steps=40, seed=1)).id
            stream = c.generate(common_pb2.VideoSpec(prompt="a blue box moves up", num_steps=2, seed=2))
            queued = next(stream).queued and None  # the stream's job exists (its first event)
            deadline = time.monotonic() + 60
            while c.get(running).status != common_pb2.RUNNING and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
            with pytest.raises(Exception):  # noqa: B017 - the server ended the stream (UNAVAILABLE/CANCELLED)
                list(stream)
        assert rc == 0, (tmp_path / "gateway.log").read_text()[-3000:]
        store = SQLiteJobStore(data / "jobs.sqlite3")
        jobs = {j.id: j.video for j in store.tenant_jobs("drain")}
        store.close()
        assert jobs[running].status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW), jobs[running]
        (other,) = [v for i, v in jobs.items() if i != running]
        assert other.status == common_pb2.QUEUED and queued is None, other  # kept for the next start
        text = (tmp_path / "gateway.log").read_text()
        assert "draining" in text and "drain: no job in flight" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        for stop in stops:
            stop()
