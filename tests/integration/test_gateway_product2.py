"""Gateway as a product, part 2: content policy, watermark verification (issue #7)."""

import json

import grpc
import pytest

from tests.helpers import InProcessMesh
from videomesh.client import VideoClient
from videomesh.errors import details_of
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh2(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh2")
    m = InProcessMesh(d, gateway={"sizes": ("256x256", "64x64"), "default_size": "256x256"})
    yield m, d, m.tenants.add("studio", "free"), m.tenants.add("rival", "pro")
    m.stop()


@pytest.mark.parametrize("prompt", ["make Trump dance", "make t r u m p dance", "让特朗普跳舞", "トランプが踊る", "a ｎａｋｅｄ man"])
def test_blocked_prompt_never_reaches_the_encoder_and_is_audited(mesh2, prompt):
    mesh, data, key, _ = mesh2
    encoder = mesh.servers["encoder"].servicer
    before = encoder.calls
    with VideoClient(mesh.address, key) as c:
        n_jobs = len(c.list(page_size=100).videos)
        with pytest.raises(grpc.RpcError) as e:
            c.create(common_pb2.VideoSpec(prompt=prompt, num_steps=1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(e.value)["reason"] == "CONTENT_POLICY"
        with pytest.raises(grpc.RpcError):
            list(c.generate(common_pb2.VideoSpec(prompt="a ball", negative_prompt=prompt, num_steps=1)))
        assert len(c.list(page_size=100).videos) == n_jobs  # no job was created
    assert encoder.calls == before
    audit = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
    assert any(a["prompt"] == prompt and a["tenant"] == "studio" for a in audit)


def test_delivered_video_carries_a_verifiable_watermark(mesh2):
    mesh, data, key, rival = mesh2
    with VideoClient(mesh.address, key) as c:
        v = list(c.generate(common_pb2.VideoSpec(prompt="a cyan box moves right on a gray background", num_steps=2)))[-1]
        v = v.completed.video
        assert v.watermark and len(v.watermark) == 8
        wm = next(ch for ch in v.quality.checks if ch.name == "watermark")
        assert wm.passed, wm.detail  # re-read from the encoded MP4 by the gateway itself
        path = v.result.uri.removeprefix("file://")
        r = c.verify_watermark(path)
        assert r.present and r.payload == v.watermark and r.video_id == v.id and r.frames == v.result.num_frames
    with VideoClient(mesh.address, rival) as c:
        r = c.verify_watermark(path)
        assert r.present and r.payload == v.watermark and r.video_id == ""  # another tenant learns nothing more
        with pytest.raises(grpc.RpcError) as e:
            c.verify_watermark(__file__)  # not a video
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
