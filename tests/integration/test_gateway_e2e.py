"""End to end through the gateway, every service a real gRPC server on loopback."""

import time

import grpc
import pytest

from gateway.media import probe
from videomesh.client import VideoClient
from videomesh.errors import details_of
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow

TERMINAL = {"completed", "failed", "cancelled"}


def spec(**kw):
    base = dict(prompt="a small red ball moves to the right on a black background", seed=7)
    base.update(kw)
    return common_pb2.VideoSpec(**base)


def test_generate_streams_ordered_events_and_writes_playable_mp4(mesh, keys):
    with VideoClient(mesh.address, keys["alice"]) as c:
        events = list(c.generate(spec(fps=12, width=48, height=64)))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert sum(k in TERMINAL for k in kinds) == 1 and kinds[-1] == "completed", kinds
    stages = [e.stage_started.stage for e in events if e.WhichOneof("event") == "stage_started"]
    assert (
        stages == sorted(stages)
        and common_pb2.STAGE_DENOISING in stages
        and common_pb2.STAGE_STORING in stages
    )
    steps = [
        e.progress.step
        for e in events
        if e.WhichOneof("event") == "progress" and e.progress.stage == common_pb2.STAGE_DENOISING
    ]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 4
    pct = [e.progress.percent for e in events if e.WhichOneof("event") == "progress"]
    assert pct == sorted(pct)
    video = events[-1].completed.video
    assert video.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW)
    r = video.result
    assert (r.width, r.height, r.fps, r.num_frames) == (48, 64, 12.0, 12)  # tiny model: 1 s clip
    path = r.uri.removeprefix("file://")
    info = probe(path)
    assert info == {"frames": 12, "fps": 12.0, "width": 48, "height": 64}
    import hashlib

    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == r.sha256


def test_create_returns_at_once_then_watch_resumes_without_gaps(mesh, keys):
    with VideoClient(mesh.address, keys["alice"]) as c:
        t0 = time.monotonic()
        v = c.create(spec(), request_id="req-1")
        assert time.monotonic() - t0 < 1.0 and v.status == common_pb2.QUEUED
        assert c.create(spec(), request_id="req-1").id == v.id  # idempotent
        first = []
        for ev in c.watch(v.id):
            first.append(ev)
            if len(first) == 3:
                break
        rest = list(c.watch(v.id, after=first[-1].sequence))
        seqs = [e.sequence for e in first + rest]
        assert seqs == list(range(1, len(seqs) + 1))
        assert rest[-1].WhichOneof("event") == "completed"
        got = c.get(v.id)
        assert got.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW) and got.progress == 100.0
        listed = c.list(page_size=100)
        assert v.id in [x.id for x in listed.videos]


def test_bad_specs_are_invalid_argument_with_field(mesh, keys):
    cases = {
        "spec.prompt": spec(prompt="   "),
        "spec.width": spec(width=-64, height=64),
        "spec.duration_seconds": spec(duration_seconds=9),
        "spec.fps": spec(fps=7),
        "spec.num_steps": spec(num_steps=5000),
    }
    with VideoClient(mesh.address, keys["alice"]) as c:
        for field, s in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                c.create(s)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in [f for f, _ in details_of(e.value)["violations"]], (field, e.value.details())
        with pytest.raises(grpc.RpcError) as e:
            c.create(spec(prompt="x" * 3000))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            c.create(spec(width=100, height=100))
        assert "64x64" in e.value.details()  # names the allowed values


def test_authentication_and_tenant_isolation(mesh, keys):
    with VideoClient(mesh.address, keys["alice"]) as alice:
        v = alice.create(spec())
    for key in (None, "vm_not-a-key"):
        c = VideoClient(mesh.address, api_key=key)
        c._metadata = [("authorization", f"Bearer {key}")] if key else []
        with pytest.raises(grpc.RpcError) as e:
            c.get(v.id)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        c.close()
    with VideoClient(mesh.address, keys["bob"]) as bob:
        for call in (lambda: bob.get(v.id), lambda: bob.cancel(v.id), lambda: list(bob.watch(v.id))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert v.id not in [x.id for x in bob.list(page_size=100).videos]


def test_cancel_finished_job_is_failed_precondition(mesh, keys):
    with VideoClient(mesh.address, keys["alice"]) as c:
        events = list(c.generate(spec()))
        vid = events[-1].completed.video.id
        with pytest.raises(grpc.RpcError) as e:
            c.cancel(vid)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_regenerate_uses_new_seed_and_links_original(mesh, keys):
    with VideoClient(mesh.address, keys["alice"]) as c:
        v = c.create(spec(seed=11))
        r = c.regenerate(v.id)
        assert r.regenerated_from == v.id and r.spec.seed != 11 and r.spec.prompt == v.spec.prompt
        events = list(c.watch(r.id))
        assert events[-1].WhichOneof("event") == "completed"
