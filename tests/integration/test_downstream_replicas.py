"""Internal services scale by replicas (issue #22): the gateway's channel to a service balances its calls
round_robin over every address the target names (`ipv4:127.0.0.1:P1,127.0.0.1:P2`, as a headless
Service's DNS name resolves), sends none to a replica whose health is not SERVING, and a replica that
dies fails no job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import start_service
from videomesh.client import VideoClient
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture
def two_of_each(tmp_path: Path):
    servers, stops = {}, []

    def up(key, name, **kw):
        srv, stop = start_service(name, **kw)
        servers[key] = srv
        stops.append(stop)

    up("encoder", "encoder", model="tiny")
    up("denoiser", "denoiser", model="tiny")
    for key in ("up1", "up2"):
        up(key, "upscaler")
    for key in ("qc1", "qc2"):
        up(key, "qc")

    def target(*keys):
        return "ipv4:" + ",".join(servers[k].address for k in keys)

    gw, gw_stop = start_service("gateway", data_dir=tmp_path, encoder=servers["encoder"].address,
                                denoiser=servers["denoiser"].address, upscaler=target("up1", "up2"),
                                qc=target("qc1", "qc2"), sizes=("64x64",), default_size="64x64",
                                fps_choices=(8.0,), default_fps=8.0, max_attempts=3,
                                retry_backoff=0.2)  # fmt: skip
    stops.insert(0, gw_stop)
    try:
        yield servers, gw
    finally:
        for stop in stops:
            try:
                stop()
            except Exception:  # noqa: BLE001 - a replica the test stopped already
                pass


def _run(client, n, seed0):
    ids = [
        client.create(common_pb2.VideoSpec(prompt="a red ball moves right", seed=seed0 + i)).id
        for i in range(n)
    ]
    out = []
    for vid in ids:
        events = list(client.watch(vid, timeout=180))
        out.append(events[-1].WhichOneof("event"))
    return out


def test_two_upscalers_and_two_qcs_share_the_work_and_one_can_go(two_of_each):
    servers, gw = two_of_each
    key = gw.tenants.add("acme", "pro")

    def calls(k, method):
        return servers[k].rpc_metrics.calls[method]

    with VideoClient(gw.address, api_key=key) as c:
        # 1. both replicas of each get work
        assert _run(c, 6, 100) == ["completed"] * 6
        assert calls("up1", "Upscale") > 0 and calls("up2", "Upscale") > 0, servers
        assert calls("qc1", "Inspect") > 0 and calls("qc2", "Inspect") > 0

        # 2. a replica that says NOT_SERVING (loading, draining) gets no new calls; the other takes them all
        servers["up1"].set_serving(False)
        time.sleep(1.0)  # the channel's health watch hears it
        before = calls("up1", "Upscale"), calls("up2", "Upscale")
        assert _run(c, 3, 200) == ["completed"] * 3
        assert calls("up1", "Upscale") == before[0]
        assert calls("up2", "Upscale") >= before[1] + 3
        servers["up1"].set_serving(True)

        # 3. a QC replica dies (stopped without a drain) while jobs run: every job still completes
        ids = [
            c.create(common_pb2.VideoSpec(prompt="a blue square moves up", seed=300 + i)).id for i in range(4)
        ]
        time.sleep(0.3)
        servers["qc1"].grpc_server.stop(0)
        ends = [list(c.watch(v, timeout=180))[-1].WhichOneof("event") for v in ids]
        assert ends == ["completed"] * 4
        got = [c.get(v) for v in ids]
        assert all(v.status == common_pb2.SUCCEEDED for v in got)


def test_a_lone_replica_that_is_not_serving_costs_the_job_no_attempt(tmp_path):
    """The channels send nothing to a replica whose health is not SERVING, so while the only upscaler
    loads (or drains) the call fails at once; the job waits for it without spending attempts, as it
    would on the service's own NOT_READY answer, and completes once the upscaler is SERVING."""
    from tests.helpers import InProcessMesh

    mesh = InProcessMesh(tmp_path, gateway={"max_attempts": 1, "retry_backoff": 0.2})
    try:
        up = mesh.servers["upscaler"]
        up.set_serving(False)
        key = mesh.tenants.add("patient", "pro")
        with VideoClient(mesh.address, api_key=key) as c:
            vid = c.create(common_pb2.VideoSpec(prompt="a red ball moves right", seed=8)).id
            time.sleep(4)  # a few tries meet the NOT_SERVING upscaler
            assert c.get(vid).status in (common_pb2.QUEUED, common_pb2.RUNNING)
            up.set_serving(True)
            end = list(c.watch(vid, timeout=120))[-1]
            assert end.WhichOneof("event") == "completed", end
    finally:
        mesh.stop()


def test_workers_and_denoise_slots_follow_the_serving_denoiser_replicas(tmp_path):
    """One denoiser replica takes `capacity` requests at once; the gateway sizes its job workers and stage
    slots from the replicas SERVING behind the target, and re-counts them (capacity_refresh_seconds), so a
    second denoiser pod gets work instead of waiting behind the first one's slots."""
    servers, stops = {}, []

    def up(key, name, **kw):
        servers[key], stop = start_service(name, **kw)
        stops.insert(0, stop)

    up("encoder", "encoder", model="tiny")
    up("d1", "denoiser", model="tiny")
    up("d2", "denoiser", model="tiny")
    up("upscaler", "upscaler")
    up("qc", "qc")
    try:
        denoisers = "ipv4:" + ",".join(servers[k].address for k in ("d1", "d2"))
        up("gw", "gateway", data_dir=tmp_path, encoder=servers["encoder"].address, denoiser=denoisers,
           upscaler=servers["upscaler"].address, qc=servers["qc"].address, sizes=("64x64",),
           default_size="64x64", fps_choices=(8.0,), default_fps=8.0, capacity_refresh_seconds=0.3)  # fmt: skip
        gw = servers["gw"].gateway
        cap = max(1, gw.model.capacity)

        def sizes():
            live = sum(t is not None and t.is_alive() for t in gw.runner.threads)
            return gw.replicas, gw.workers, gw.pipeline.slots["denoiser"].limit, live

        def settle(want, limit=15.0):
            deadline = time.monotonic() + limit
            while sizes() != want and time.monotonic() < deadline:
                time.sleep(0.1)
            return sizes()

        assert settle((2, 2 * cap + 1, 2 * cap, 2 * cap + 1)) == (2, 2 * cap + 1, 2 * cap, 2 * cap + 1)
        key = servers["gw"].tenants.add("acme", "pro")
        with VideoClient(servers["gw"].address, api_key=key) as c:
            assert _run(c, 4, 500) == ["completed"] * 4
            assert (
                servers["d1"].rpc_metrics.calls["Denoise"] > 0
                and servers["d2"].rpc_metrics.calls["Denoise"] > 0
            )

            servers["d1"].set_serving(False)  # draining, or its pod went away: one replica's worth of work
            assert settle((1, cap + 1, cap, cap + 1)) == (1, cap + 1, cap, cap + 1)
            assert _run(c, 2, 600) == ["completed"] * 2

            servers["d1"].set_serving(True)  # scaled back up
            assert settle((2, 2 * cap + 1, 2 * cap, 2 * cap + 1)) == (2, 2 * cap + 1, 2 * cap, 2 * cap + 1)
            assert _run(c, 2, 700) == ["completed"] * 2
    finally:
        for stop in stops:
            stop()
