"""Gateway as a product, part 2: content policy, watermark verification (issue #7)."""

import json

import grpc
import pytest

from tests.helpers import InProcessMesh
from videomesh.client import VideoClient
from videomesh.errors import details_of
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mesh2(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("mesh2")
    database = "" if request.param == "sqlite" else request.getfixturevalue("pg").database()
    m = InProcessMesh(
        d, database=database, gateway={"sizes": ("256x256", "64x64"), "default_size": "256x256"}
    )
    yield m, d, m.tenants.add("studio", "free"), m.tenants.add("rival", "pro")
    m.stop()


@pytest.mark.parametrize(
    "prompt",
    ["make Trump dance", "make t r u m p dance", "让特朗普跳舞", "トランプが踊る", "a ｎａｋｅｄ man"],
)
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
    import hashlib

    digest = hashlib.sha256(prompt.encode()).hexdigest()
    assert any(a["prompt_sha256"] == digest and a["tenant"] == "studio" for a in audit)
    assert all("prompt" not in a for a in audit)  # audited without the user's text


def test_delivered_video_carries_a_verifiable_watermark(mesh2):
    mesh, data, key, rival = mesh2
    with VideoClient(mesh.address, key) as c:
        v = list(
            c.generate(
                common_pb2.VideoSpec(prompt="a cyan box moves right on a gray background", num_steps=2)
            )
        )[-1]
        v = v.completed.video
        assert v.watermark and len(v.watermark) == 8
        wm = next(ch for ch in v.quality.checks if ch.name == "watermark")
        assert wm.passed, wm.detail  # re-read from the encoded MP4 by the gateway itself
        path = v.result.uri.removeprefix("file://")
        r = c.verify_watermark(path)
        assert (
            r.present and r.payload == v.watermark and r.video_id == v.id and r.frames == v.result.num_frames
        )
    with VideoClient(mesh.address, rival) as c:
        r = c.verify_watermark(path)
        assert (
            r.present and r.payload == v.watermark and r.video_id == ""
        )  # another tenant learns nothing more
        with pytest.raises(grpc.RpcError) as e:
            c.verify_watermark(__file__)  # not a video
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_templates_cache_usage_feedback_delete(mesh2):
    mesh, data, key, _ = mesh2
    with VideoClient(mesh.address, key) as c:
        tpls = {t.id: t for t in c.templates()}
        assert {"shape_showcase", "product_intro", "holiday_greeting"} <= set(tpls)
        with pytest.raises(grpc.RpcError) as e:
            c.create_from_template("product_intro", {})  # a required field is missing
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "product" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.create_from_template("shape_showcase", {"color": "magenta"})
        assert "one of" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.create_from_template("nope", {})
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        fields = {"color": "green", "direction": "left"}
        overrides = common_pb2.VideoSpec(width=64, height=64, num_steps=2)
        first = c.create_from_template("shape_showcase", fields, overrides)
        assert (
            first.spec.prompt == "a large green ball moving left on a black background"
            and first.template_id == "shape_showcase"
        )
        first_events = list(c.watch(first.id))
        assert first_events[-1].WhichOneof("event") == "completed"
        first = c.get(first.id)
        assert first.status == common_pb2.SUCCEEDED, first.quality
        # the same fields again: served from the cache at once, same bytes, own copy
        second = c.create_from_template("shape_showcase", fields, overrides)
        assert second.status == common_pb2.SUCCEEDED and second.cached
        assert second.result.sha256 == first.result.sha256 and second.result.uri != first.result.uri
        # a new seed is a new video
        third = c.create(
            common_pb2.VideoSpec(
                prompt=first.spec.prompt, width=64, height=64, num_steps=2, seed=first.spec.seed + 1
            )
        )
        assert not third.cached
        list(c.watch(third.id))
        fid = c.feedback(first.id, 2, "wrong direction")
        assert fid.startswith("fb_")
        assert mesh.gateway.store.feedback_for(first.id) == [(2, "wrong direction")]
        with pytest.raises(grpc.RpcError) as e:
            c.feedback(first.id, 9)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            c.create(common_pb2.VideoSpec(prompt="make putin dance"))
        u = c.usage()
        assert u.tenant == "studio" and u.cache_hits >= 1 and u.jobs["SUCCEEDED"] >= 3
        assert u.output_seconds >= 3 * first.result.duration_seconds - 1e-6
        assert u.compute_seconds["denoise"] > 0 and u.blocked_prompts >= 1
        # delete: the file goes, the record stays; the cache no longer serves it
        path = first.result.uri.removeprefix("file://")
        gone = c.delete(first.id)
        assert gone.deleted and not gone.result.uri
        import os

        assert not os.path.exists(path)
        again = c.create_from_template("shape_showcase", fields, overrides)
        assert again.cached  # still cached through the second copy
        c.delete(second.id)
        c.delete(again.id)
        fresh = c.create_from_template("shape_showcase", fields, overrides)
        assert not fresh.cached  # no copy left: generated anew
        list(c.watch(fresh.id))


def test_retention_deletes_old_files(tmp_path, database):
    mesh = InProcessMesh(tmp_path, database=database, gateway={"retention_seconds": 1.0})
    try:
        key = mesh.tenants.add("short", "pro")
        with VideoClient(mesh.address, key) as c:
            v = list(c.generate(common_pb2.VideoSpec(prompt="a blue ball moves up", num_steps=1)))[
                -1
            ].completed.video
            path = v.result.uri.removeprefix("file://")
            import os
            import time

            assert os.path.exists(path)
            deadline = time.monotonic() + 10
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not os.path.exists(path)
            assert c.get(v.id).deleted
    finally:
        mesh.stop()


def test_cli_usage_verify_review(mesh2, capsys):
    from videomesh.cli import main

    mesh, data, key, _ = mesh2
    with VideoClient(mesh.address, key) as c:
        v = list(c.generate(common_pb2.VideoSpec(prompt="a red box moves down", num_steps=1)))[
            -1
        ].completed.video
    common = ["--gateway", mesh.address, "--api-key", key]
    assert main(["usage", *common, "--templates"]) == 0
    out = capsys.readouterr().out
    assert "tenant studio" in out and "template shape_showcase" in out
    assert main(["verify", v.result.uri.removeprefix("file://"), *common]) == 0
    assert f"watermark {v.watermark}" in capsys.readouterr().out
    assert main(["review", v.id, *common]) == 0
    assert "watermark" in capsys.readouterr().out
    assert main(["review", v.id, "--approve", *common]) == 1  # not held for review: FAILED_PRECONDITION
