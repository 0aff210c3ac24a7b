"""The quality gate end to end: failed QC -> a new seed -> NEEDS_REVIEW -> a reviewer decides."""

import grpc
import pytest

from tests.helpers import InProcessMesh
from videomesh.client import VideoClient
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    # every frame counts as black for this QC replica: every clip is "corrupted"
    m = InProcessMesh(
        tmp_path_factory.mktemp("gate"), qc={"black_luma": 256.0}, gateway={"qc_regenerations": 1}
    )
    key = m.tenants.add("brand", "pro")
    yield m, key
    m.stop()


def _spec():
    return common_pb2.VideoSpec(prompt="a white ball moves up on a navy background", seed=42, num_steps=2)


def test_failed_gate_regenerates_then_holds_for_review_and_approve_succeeds(gated):
    mesh, key = gated
    with VideoClient(mesh.address, key) as c:
        events = list(c.generate(_spec()))
        assert sum(e.WhichOneof("event") in ("completed", "failed", "cancelled") for e in events) == 1
        v = events[-1].completed.video
        assert v.status == common_pb2.NEEDS_REVIEW
        assert v.qc_regenerations == 1 and v.spec.seed != 42  # tried a new seed first
        black = next(ch for ch in v.quality.checks if ch.name == "black_frames")
        assert not black.passed and black.frames[0].start == 0
        assert v.result.sha256  # the file is there for the reviewer
        stages = [e.stage_started.stage for e in events if e.WhichOneof("event") == "stage_started"]
        assert stages.count(common_pb2.STAGE_DENOISING) == 2
        with pytest.raises(grpc.RpcError) as e:
            c.cancel(v.id)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        approved = c.review(v.id, approve=True, note="looks fine to me")
        assert approved.status == common_pb2.SUCCEEDED and approved.review_note == "looks fine to me"
        with pytest.raises(grpc.RpcError) as e:
            c.review(v.id, approve=False)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_reject_fails_the_video_with_the_reason(gated):
    mesh, key = gated
    with VideoClient(mesh.address, key) as c:
        v = list(c.generate(_spec()))[-1].completed.video
        rejected = c.review(v.id, approve=False, note="off-brand colours")
        assert rejected.status == common_pb2.FAILED
        assert rejected.error.reason == "REJECTED_IN_REVIEW" and rejected.error.message == "off-brand colours"
    other = mesh.tenants.add("someone-else", "pro")
    with VideoClient(mesh.address, other) as c, pytest.raises(grpc.RpcError) as e:
        c.review(v.id, approve=True)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
