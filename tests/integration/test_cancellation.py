"""Cancellation and deadlines propagate to the denoiser, which stops at the next step."""

import time

import grpc
import pytest

from tests.helpers import InProcessMesh
from videomesh.client import VideoClient
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture(scope="module")
def slow_mesh(tmp_path_factory):
    # the full-size default architecture: a step takes long enough to cancel in the middle
    m = InProcessMesh(tmp_path_factory.mktemp("slowmesh"), model="default",
                      gateway={"sizes": ("64x64",), "default_size": "64x64", "workers": 1})  # fmt: skip
    key = m.tenants.add("carol", "pro")
    yield m, key
    m.stop()


def _denoiser_idle(mesh, timeout=5.0) -> bool:
    servicer = mesh.servers["denoiser"].servicer
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if servicer.active == 0:
            return True
        time.sleep(0.02)
    return False


def _spec():
    return common_pb2.VideoSpec(prompt="a blue box slides left on a gray background", seed=1, num_steps=STEPS)


def test_cancel_mid_denoise_stops_within_one_step(slow_mesh):
    mesh, key = slow_mesh
    with VideoClient(mesh.address, key) as c:
        v = c.create(_spec())
        step_times = []
        for ev in c.watch(v.id):
            if ev.WhichOneof("event") == "progress" and ev.progress.stage == common_pb2.STAGE_DENOISING:
                step_times.append(ev.time.ToNanoseconds() / 1e9)
                if len(step_times) == 3:
                    break
        step = (step_times[-1] - step_times[0]) / 2
        t_cancel = time.time()
        out = c.cancel(v.id)
        assert out.status == common_pb2.CANCELLED
        events = list(c.watch(v.id))
        after = [
            e
            for e in events
            if e.WhichOneof("event") == "progress" and e.time.ToNanoseconds() / 1e9 > t_cancel
        ]
        assert len(after) <= 1, f"{len(after)} denoiser steps ran after the cancel (one step = {step:.2f}s)"
        assert events[-1].WhichOneof("event") == "cancelled"
        assert sum(e.WhichOneof("event") in ("completed", "failed", "cancelled") for e in events) == 1
        assert _denoiser_idle(mesh, timeout=step * 2 + 1), "the denoiser kept working after the cancel"


def test_client_deadline_cancels_the_job_downstream(slow_mesh):
    mesh, key = slow_mesh
    with VideoClient(mesh.address, key) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            for _ in c.generate(_spec(), timeout=2.0):
                pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 5
        vid = c.list(page_size=1).videos[0].id
        deadline = time.monotonic() + 10
        while (
            c.get(vid).status not in (common_pb2.CANCELLED, common_pb2.FAILED) and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert c.get(vid).status == common_pb2.CANCELLED
        assert _denoiser_idle(mesh), "the denoiser kept working after the deadline"


def test_cancel_queued_job_never_runs(slow_mesh):
    mesh, key = slow_mesh
    with VideoClient(mesh.address, key) as c:
        running = c.create(_spec())
        queued = c.create(_spec())
        out = c.cancel(queued.id)
        assert out.status == common_pb2.CANCELLED
        kinds = [e.WhichOneof("event") for e in c.watch(queued.id)]
        assert kinds == ["queued", "cancelled"]
        c.cancel(running.id)
        assert _denoiser_idle(mesh)
