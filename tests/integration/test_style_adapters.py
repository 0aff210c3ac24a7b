"""Brand style adapters (LoRA) through the mesh: who may use which, what they change, errors."""

import shutil

import grpc
import numpy as np
import pytest

from tests.helpers import InProcessMesh, random_adapter
from videomesh.client import VideoClient
from videomesh.errors import details_of
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def amesh(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("adapters")
    random_adapter("public-look", 1).save(adapters / "public-look.safetensors")
    random_adapter("acme/own-look", 2).save(adapters / "acme" / "own-look.safetensors")
    m = InProcessMesh(
        tmp_path_factory.mktemp("amesh"),
        denoiser={"adapters_dir": adapters},
        gateway={"cache": False, "model_refresh_seconds": 0.0},
    )
    m.adapters_dir = adapters
    m.keys = {"acme": m.tenants.add("acme", "pro"), "other": m.tenants.add("other", "pro")}
    yield m
    m.stop()


def spec(**kw):
    return common_pb2.VideoSpec(**{"prompt": "a red ball moves to the right", "seed": 5, **kw})


def _frames(video) -> np.ndarray:
    import cv2

    assert video.result.uri.startswith("file://")
    cap = cv2.VideoCapture(video.result.uri.removeprefix("file://"))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    return np.stack(out)


def test_each_tenant_sees_public_adapters_and_its_own(amesh):
    with VideoClient(amesh.address, amesh.keys["acme"]) as c:
        assert {a.name for a in c.style_adapters()} == {"public-look", "acme/own-look"}
        assert all(a.rank == 2 and a.parameters > 0 for a in c.style_adapters())
    with VideoClient(amesh.address, amesh.keys["other"]) as c:
        assert {a.name for a in c.style_adapters()} == {"public-look"}


def test_another_tenants_adapter_reads_as_absent_and_bad_values_are_named(amesh):
    with VideoClient(amesh.address, amesh.keys["other"]) as c:
        for bad, field in (
            (spec(style_adapter="acme/own-look"), "spec.style_adapter"),
            (spec(style_adapter="nope"), "spec.style_adapter"),
            (spec(style_adapter="public-look", style_strength=3.0), "spec.style_strength"),
            (spec(style_strength=0.5), "spec.style_strength"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                c.create(bad)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in [f for f, _ in details_of(e.value)["violations"]], e.value.details()
            if field == "spec.style_adapter":
                assert "choose one of: public-look" in e.value.details()
                assert "own-look'" not in e.value.details().split("choose one of")[1]
        assert list(c.list().videos) == []  # nothing was created


def test_an_adapter_changes_the_clip_and_the_base_comes_back(amesh):
    with VideoClient(amesh.address, amesh.keys["acme"]) as c:
        plain = _finish(c, spec())
        styled = _finish(c, spec(style_adapter="acme/own-look"))
        half = _finish(c, spec(style_adapter="acme/own-look", style_strength=0.5))
        plain_again = _finish(c, spec())  # the result cache is off here: generated anew
    assert styled.spec.style_adapter == "acme/own-look" and styled.spec.style_strength == 1.0
    assert not plain_again.cached
    a, b, h, a2 = (_frames(v).astype(int) for v in (plain, styled, half, plain_again))
    assert np.abs(a - b).mean() > 5 and np.abs(a - h).mean() > 1 and np.abs(b - h).mean() > 1
    assert np.abs(a - a2).mean() < 1  # the base weights were restored after the adapter
    # the result cache keys on the adapter and its strength
    from gateway.tenants import Tenant

    acme = Tenant("acme", "pro")
    keys = {amesh.gateway.cache_key(v.spec, acme) for v in (plain, styled, half)}
    assert len(keys) == 3 and amesh.gateway.cache_key(plain_again.spec, acme) == amesh.gateway.cache_key(
        plain.spec, acme
    )


def test_an_adapter_installed_later_is_found_without_a_restart(amesh):
    shutil.copy(amesh.adapters_dir / "public-look.safetensors", amesh.adapters_dir / "late-look.safetensors")
    with VideoClient(amesh.address, amesh.keys["other"]) as c:
        v = _finish(c, spec(style_adapter="late-look"))
    assert v.status == common_pb2.SUCCEEDED


def _finish(c, s):
    events = list(c.generate(s))
    assert events[-1].WhichOneof("event") == "completed", events[-1]
    return c.get(events[-1].video_id)
