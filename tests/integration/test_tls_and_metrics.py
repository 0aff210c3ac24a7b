"""TLS on the public gateway port, and Prometheus metrics on every service (issue #22)."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest

from tests.helpers import InProcessMesh, start_service
from videomesh.client import VideoClient
from videomesh.metrics import exported_names
from videomesh.tls import self_signed
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(d / "tls")
    m = InProcessMesh(
        d / "data", gateway={"tls_cert": cert, "tls_key": key, "metrics_port": 0, "health_port": 0}
    )
    yield m, cert
    m.stop()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_the_gateway_speaks_tls_and_clients_verify_it(tls_mesh, tmp_path):
    mesh, cert = tls_mesh
    key = mesh.tenants.add("tls-tenant", "pro")
    with VideoClient(mesh.address, api_key=key, ca=str(cert)) as c:
        events = list(c.generate(common_pb2.VideoSpec(prompt="a blue square moves up", seed=5), timeout=120))
        assert events[-1].WhichOneof("event") == "completed"
        assert c.get(events[-1].completed.video.id).status == common_pb2.SUCCEEDED
    # plaintext to a TLS port: refused at the handshake, nothing served
    with VideoClient(mesh.address, api_key=key) as c, pytest.raises(grpc.RpcError) as err:
        c.get(events[-1].completed.video.id)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a certificate the client does not trust: refused too
    other, _ = self_signed(tmp_path / "other")
    with VideoClient(mesh.address, api_key=key, ca=str(other)) as c, pytest.raises(grpc.RpcError) as err:
        c.get(events[-1].completed.video.id)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="cannot read"):
        VideoClient(mesh.address, api_key=key, ca=str(tmp_path / "missing.pem"))


def test_every_service_exports_rpc_metrics_and_the_gateway_its_own(tls_mesh):
    mesh, cert = tls_mesh
    key = mesh.tenants.add("metrics-tenant", "pro")
    port = mesh.servers["gateway"].metrics_port
    before = _scrape(port)
    spec = common_pb2.VideoSpec(prompt="a green triangle moves left", seed=21)
    with VideoClient(mesh.address, api_key=key, ca=str(cert)) as c:
        assert list(c.generate(spec, timeout=120))[-1].WhichOneof("event") == "completed"
        c.create(spec)  # the same request again: a cache hit
        with pytest.raises(grpc.RpcError):
            c.get("no-such-video")
    after = _scrape(port)

    def grew(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    # one registry per process: the in-process downstreams' RPCs are in the same scrape, by service label
    assert grew("videomesh_rpc_requests_total", service="gateway", method="GenerateVideo", code="OK") == 1
    assert grew("videomesh_rpc_requests_total", service="gateway", method="GetVideo", code="NOT_FOUND") == 1
    assert grew("videomesh_rpc_requests_total", service="encoder", method="Encode", code="OK") >= 1
    assert grew("videomesh_rpc_requests_total", service="denoiser", method="Denoise", code="OK") >= 1
    assert grew("videomesh_rpc_requests_total", service="upscaler", method="Upscale", code="OK") >= 1
    assert grew("videomesh_rpc_requests_total", service="qc", method="Inspect", code="OK") >= 1
    assert grew("videomesh_rpc_duration_seconds_count", service="denoiser", method="Denoise") >= 1
    for svc in ("gateway", "encoder", "denoiser", "upscaler", "qc"):  # every call counted in has gone out
        assert _value(after, "videomesh_rpc_in_flight", service=svc) == 0, svc
    assert grew("videomesh_queue_wait_seconds_count") >= 1
    for stage in ("encode", "denoise", "upscale", "qc", "store"):
        assert grew("videomesh_stage_seconds_count", stage=stage) == 1, stage
    assert grew("videomesh_cache_lookups_total", result="hit") == 1
    assert grew("videomesh_cache_lookups_total", result="miss") >= 1
    assert grew("videomesh_denoiser_step_seconds_count") >= 1
    assert grew("videomesh_denoiser_batch_size_count") >= 1
    assert "videomesh_review_backlog " in after
    assert grew("videomesh_jobs_total", status="SUCCEEDED") >= 1
    # every name the registry declares is exported under that name (what dashboards and alerts use)
    names = {
        line.split("{")[0].split(" ")[0] for line in after.splitlines() if line and not line.startswith("#")
    }
    assert (
        {"videomesh_rpc_requests_total", "videomesh_queue_wait_seconds_bucket"} <= names <= exported_names()
    )


def test_an_internal_service_serves_metrics_on_its_own_port():
    server, stop = start_service("upscaler", metrics_port=0)
    try:
        before = _scrape(server.metrics_port)
        with grpc.insecure_channel(server.address) as ch:  # an empty Upscale stream: the client's mistake
            with pytest.raises(grpc.RpcError) as err:
                list(ch.stream_stream("/videomesh.v1.Upscaler/Upscale")(iter([b""]), timeout=10))
        code = err.value.code().name
        after = _scrape(server.metrics_port)
        labels = dict(service="upscaler", method="Upscale", code=code)
        assert (
            _value(after, "videomesh_rpc_requests_total", **labels)
            - _value(before, "videomesh_rpc_requests_total", **labels)
            == 1
        ), code
        assert _value(after, "videomesh_rpc_in_flight", service="upscaler") == 0
    finally:
        stop()


def test_probes_get_health_in_plaintext_on_the_health_port_and_only_health(tls_mesh, capsys):
    from grpc_health.v1 import health_pb2

    from videomesh import probe

    mesh, cert = tls_mesh
    gw = mesh.servers["gateway"]
    health = f"127.0.0.1:{gw.health_port}"
    assert probe.main([health]) == 0
    assert probe.main([health, "--service", "videomesh.v1.Upscaler"]) == 0  # the mirrored downstreams too
    assert probe.main([gw.address, "--ca", str(cert)]) == 0  # or over TLS on the public port
    assert probe.main([gw.address, "--timeout", "1"]) == 1  # plaintext to the TLS port: no answer
    # the health port serves nothing else
    key = mesh.tenants.add("probe-tenant", "pro")
    with VideoClient(health, api_key=key) as c, pytest.raises(grpc.RpcError) as err:
        c.get("anything")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    gw.set_serving(False)  # draining or loading: the probe says so
    try:
        assert probe.check(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert probe.main([health]) == 1
    finally:
        gw.set_serving(True)


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path):
    """The files change (a renewal): the next handshake gets the new certificate; a client that trusts
    only the old one is refused from then on. No restart."""
    import shutil

    old_dir, new_dir, live = tmp_path / "old", tmp_path / "new", tmp_path / "live"
    old_cert, _ = self_signed(old_dir)
    new_cert, _ = self_signed(new_dir)
    live.mkdir()
    for f in ("cert.pem", "key.pem"):
        shutil.copy(old_dir / f, live / f)
    mesh = InProcessMesh(
        tmp_path / "data", gateway={"tls_cert": live / "cert.pem", "tls_key": live / "key.pem"}
    )
    try:
        key = mesh.tenants.add("renew", "pro")
        with VideoClient(mesh.address, api_key=key, ca=str(old_cert)) as c:
            assert c.list().videos is not None
        time.sleep(0.01)
        for f in ("key.pem", "cert.pem"):  # renewed in place
            shutil.copy(new_dir / f, live / f)
        with VideoClient(mesh.address, api_key=key, ca=str(new_cert)) as c:
            assert c.list().videos is not None
        with (
            VideoClient(mesh.address, api_key=key, ca=str(old_cert)) as c,
            pytest.raises(grpc.RpcError) as err,
        ):
            c.list()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        mesh.stop()
