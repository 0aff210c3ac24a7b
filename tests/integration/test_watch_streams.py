"""Event streams (issue 18, item 14): WatchVideo ends on a finished job, and open streams are capped.

Each open WatchVideo/GenerateVideo holds one of the gateway's worker threads. Before the fix, a
watch resumed at (or past) a finished job's last event never ended, and 40 such idle streams
from one tenant took every worker: other tenants' calls and the health check timed out.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.jobs import Job, new_id, now_ts
from videomesh.errors import details_of
from videomesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

TERMINAL = ("completed", "failed", "cancelled")


def auth(key: str):
    return [("authorization", f"Bearer {key}")]


@pytest.fixture()
def channel(mesh):
    ch = grpc.insecure_channel(mesh.address)
    yield ch
    ch.close()


def idle_job(mesh, tenant: str) -> str:
    """A RUNNING job that no worker runs: a stream on it after its last event stays idle."""
    video = gateway_pb2.Video(id=new_id(), status=common_pb2.RUNNING, stage=common_pb2.STAGE_DENOISING,
                              spec=common_pb2.VideoSpec(prompt="idle"), create_time=now_ts(), update_time=now_ts())  # fmt: skip
    mesh.gateway.store.create(Job(id=video.id, tenant=tenant, video=video, tier="pro"))
    mesh.gateway.store.append_event(video.id, gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=1)))
    return video.id


def end_job(mesh, video_id: str) -> None:
    def mut(v):
        v.status = common_pb2.CANCELLED

    mesh.gateway.store.finish(video_id, mut, gateway_pb2.VideoEvent(cancelled=gateway_pb2.Cancelled()))


def open_watches(stub, key: str, video_id: str, n: int, after: int = 1) -> list:
    req = gateway_pb2.WatchVideoRequest(id=video_id, after_sequence=after)
    return [stub.WatchVideo(req, metadata=auth(key), timeout=120) for _ in range(n)]


def settle(calls: list, refused: int, timeout: float = 10.0) -> tuple[list, list]:
    """Wait until `refused` calls have ended; -> (ended, still open)."""
    deadline = time.monotonic() + timeout
    while sum(c.done() for c in calls) < refused and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # and no more than that
    return [c for c in calls if c.done()], [c for c in calls if not c.done()]


def quick_calls(channel, key: str, video_id: str) -> float:
    """Another tenant's GetVideo and the health check; -> the slower one's seconds."""
    t0 = time.monotonic()
    got = gateway_pb2_grpc.VideoServiceStub(channel).GetVideo(
        gateway_pb2.GetVideoRequest(id=video_id), metadata=auth(key), timeout=3
    )
    assert got.id == video_id
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - t0


def test_watch_of_a_finished_job_after_its_last_event_ends_at_once(mesh, keys, channel):
    stub = gateway_pb2_grpc.VideoServiceStub(channel)
    spec = common_pb2.VideoSpec(prompt="a red ball moves left on a black background", seed=5, num_steps=1)
    events = list(stub.GenerateVideo(gateway_pb2.CreateVideoRequest(spec=spec), metadata=auth(keys["alice"]),
                                     timeout=120))  # fmt: skip
    assert events[-1].WhichOneof("event") in TERMINAL
    vid, last = events[-1].video_id, events[-1].sequence
    for after in (last, last + 1, last + 1000):
        t0 = time.monotonic()
        req = gateway_pb2.WatchVideoRequest(id=vid, after_sequence=after)
        assert list(stub.WatchVideo(req, metadata=auth(keys["alice"]), timeout=5)) == []
        assert time.monotonic() - t0 < 1.0, after
    # one before the end: just the terminal event, then the end
    req = gateway_pb2.WatchVideoRequest(id=vid, after_sequence=last - 1)
    assert [e.sequence for e in stub.WatchVideo(req, metadata=auth(keys["alice"]), timeout=5)] == [last]


def test_watch_of_a_cancelled_queued_job_at_its_end_ends(mesh, keys, channel):
    vid = idle_job(mesh, "alice")
    end_job(mesh, vid)  # events: queued (1), cancelled (2)
    stub = gateway_pb2_grpc.VideoServiceStub(channel)
    req = gateway_pb2.WatchVideoRequest(id=vid, after_sequence=2)
    assert list(stub.WatchVideo(req, metadata=auth(keys["alice"]), timeout=5)) == []


def test_idle_streams_are_capped_per_tenant_and_others_still_answer(mesh, keys, channel):
    """40 idle WatchVideo streams from one tenant: 8 open, 32 RESOURCE_EXHAUSTED with a retry delay;
    bob's GetVideo and the health check answer at once; a slot comes back when a stream ends."""
    settings = mesh.gateway.settings
    per_tenant = settings.max_streams_per_tenant
    key = mesh.tenants.add("streamer", "pro")
    stub = gateway_pb2_grpc.VideoServiceStub(channel)
    jobs = [idle_job(mesh, "streamer") for _ in range(4)]
    bob_job = idle_job(mesh, "bob")
    calls = [c for i in range(40) for c in open_watches(stub, key, jobs[i % 4], 1)]
    try:
        ended, still_open = settle(calls, refused=40 - per_tenant)
        assert quick_calls(channel, keys["bob"], bob_job) < 1.0  # before the fix: DEADLINE_EXCEEDED
        assert len(still_open) == per_tenant and len(ended) == 40 - per_tenant
        for c in ended:
            assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, c.details()
            info = details_of(c)
            assert info["reason"] == "TOO_MANY_STREAMS" and info["retry_after"] > 0
            assert f"limit is {per_tenant}" in c.details()

        # a stream that ends (its job finished) gives its slot back
        job_of_open = {id(c): jobs[calls.index(c) % 4] for c in still_open}
        finished = job_of_open[id(still_open[0])]
        end_job(mesh, finished)
        done = [c for c in still_open if job_of_open[id(c)] == finished]
        for c in done:
            assert [e.WhichOneof("event") for e in c] == ["cancelled"]
        more = open_watches(stub, key, jobs[(jobs.index(finished) + 1) % 4], len(done) + 1)
        calls += more
        ended, still = settle(more, refused=1)
        assert len(ended) == 1 and len(still) == len(done)
        assert ended[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # a client that goes away gives its slots back too
        for c in calls:
            c.cancel()
        time.sleep(1.0)  # the handlers notice within their 0.5 s wait
        again = open_watches(stub, key, jobs[1], per_tenant)
        calls += again
        ended, still = settle(again, refused=0, timeout=0.5)
        assert ended == [] and len(still) == per_tenant
    finally:
        for c in calls:
            c.cancel()


def test_total_streams_stay_below_the_worker_pool(mesh, keys, channel):
    """Tenants each within their cap still cannot take every worker: beyond max_streams in all,
    RESOURCE_EXHAUSTED; the health check and GetVideo keep answering."""
    s = mesh.gateway.settings
    stub = gateway_pb2_grpc.VideoServiceStub(channel)
    n_tenants = -(-s.max_streams // s.max_streams_per_tenant) + 1
    calls = []
    bob_job = idle_job(mesh, "bob")
    try:
        for i in range(n_tenants):
            name = f"many{i}"
            key = mesh.tenants.add(name, "pro")
            calls += open_watches(stub, key, idle_job(mesh, name), s.max_streams_per_tenant)
        ended, still_open = settle(calls, refused=len(calls) - s.max_streams)
        assert len(still_open) == s.max_streams
        assert {details_of(c)["reason"] for c in ended} == {"STREAMS_BUSY"}
        assert all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in ended)
        assert quick_calls(channel, keys["bob"], bob_job) < 1.0
    finally:
        for c in calls:
            c.cancel()
    time.sleep(1.0)


def test_generate_beyond_the_cap_is_refused_and_creates_no_job(mesh, keys, channel):
    s = mesh.gateway.settings
    key = mesh.tenants.add("gen", "pro")
    stub = gateway_pb2_grpc.VideoServiceStub(channel)
    calls = open_watches(stub, key, idle_job(mesh, "gen"), s.max_streams_per_tenant)
    try:
        ended, _ = settle(calls, refused=0, timeout=0.5)
        assert ended == []
        before = len(mesh.gateway.store.tenant_jobs("gen"))
        spec = common_pb2.VideoSpec(prompt="a red ball moves left", seed=5, num_steps=1)
        with pytest.raises(grpc.RpcError) as e:
            list(
                stub.GenerateVideo(gateway_pb2.CreateVideoRequest(spec=spec), metadata=auth(key), timeout=10)
            )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(mesh.gateway.store.tenant_jobs("gen")) == before
    finally:
        for c in calls:
            c.cancel()
    time.sleep(1.0)
