"""Internal hops are authenticated (issue #22): every RPC of every internal service, called directly
without the mesh credential, is refused UNAUTHENTICATED before its servicer runs; health and reflection
answer without it; the gateway carries it; the secret rotates without a restart."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.pipeline import SERVICE_NAMES as INTERNAL  # the four internal services
from tests.helpers import InProcessMesh, methods, raw_call, start_service
from videomesh import config
from videomesh.client import VideoClient, channel
from videomesh.launch import load_settings, server_options
from videomesh.meshauth import FILE_ENV, HEADER, MeshSecrets
from videomesh.v1 import common_pb2


def _method(service: str, name: str):
    return next(m for m in methods(service) if m.name == name)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """The four internal services as their processes start them, with a mesh secret file."""
    secret_file = tmp_path_factory.mktemp("mesh") / "secret"
    secret_file.write_text("s3cr3t-current\ns3cr3t-previous\n")
    mp = pytest.MonkeyPatch()
    mp.setenv(FILE_ENV, str(secret_file))
    servers, stops = {}, []
    try:
        for name in INTERNAL:
            srv, stop = start_service(name, **({"model": "tiny"} if name in ("encoder", "denoiser") else {}))
            servers[name], _ = srv, stops.append(stop)
        yield servers, secret_file
    finally:
        for stop in stops:
            stop()
        mp.undo()


def test_every_internal_rpc_without_the_mesh_credential_is_unauthenticated(guarded):
    servers, _ = guarded
    encodes_before = servers["encoder"].servicer.calls
    refused = total = 0
    for name, service in INTERNAL.items():
        with grpc.insecure_channel(servers[name].address) as ch:
            for method in methods(service):
                for metadata in ((), ((HEADER, "wrong"),), (("authorization", "Bearer vm_x"),)):
                    code = raw_call(ch, method, metadata=metadata)
                    total += 1
                    refused += code == grpc.StatusCode.UNAUTHENTICATED
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, method.name, metadata, code)
    assert refused == total == 3 * sum(len(methods(s)) for s in INTERNAL.values()) >= 3 * 4
    assert servers["encoder"].servicer.calls == encodes_before  # refused before the servicer ran
    with channel(servers["encoder"].address, mesh=MeshSecrets.from_env()) as ch:
        raw_call(ch, _method(INTERNAL["encoder"], "Encode"))
    assert (
        servers["encoder"].servicer.calls == encodes_before + 1
    )  # (the counter does count calls that get in)


def test_with_the_credential_the_call_reaches_the_servicer_and_either_secret_is_accepted(guarded):
    servers, _ = guarded
    service = INTERNAL["encoder"]
    with grpc.insecure_channel(servers["encoder"].address) as ch:
        for secret in ("s3cr3t-current", "s3cr3t-previous"):
            # an empty EncodeRequest is the client's mistake: INVALID_ARGUMENT from the servicer, not a refusal
            code = raw_call(ch, _method(service, "Encode"), metadata=((HEADER, secret),))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (secret, code)
    # the SDK's channel adds it from the same secrets
    with channel(servers["denoiser"].address, mesh=MeshSecrets.from_env()) as ch:
        assert raw_call(ch, _method(INTERNAL["denoiser"], "GetModelInfo")) == grpc.StatusCode.OK


def test_health_and_reflection_answer_without_the_credential(guarded):
    servers, _ = guarded
    for name, service in INTERNAL.items():
        with grpc.insecure_channel(servers[name].address) as ch:
            st = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert st.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = [s.name for r in replies for s in r.list_services_response.service]
            assert service in names


def test_the_secret_file_rotates_without_a_restart(tmp_path):
    f = tmp_path / "secret"
    f.write_text("old\n")
    secrets = MeshSecrets(file=f, reread=0.0)
    assert secrets.check("old") and not secrets.check("new") and secrets.current() == "old"
    f.write_text("new\nold\n")  # step 1: both accepted, the new one sent
    assert secrets.check("new") and secrets.check("old") and secrets.current() == "new"
    f.write_text("new\n")  # step 2: the old one dropped
    assert secrets.check("new") and not secrets.check("old")
    f.write_text("")  # a half-written file keeps the last good secrets
    assert secrets.check("new")
    assert not secrets.check("") and not secrets.check(None)


def test_an_internal_service_beyond_loopback_without_a_secret_does_not_start():
    settings = load_settings("upscaler", host="0.0.0.0")
    with pytest.raises(config.ConfigError, match=FILE_ENV):
        server_options("upscaler", settings, env={})
    assert server_options("upscaler", settings, env={"VIDEOMESH_MESH_SECRET": "x"})["mesh"] is not None
    # loopback without one: allowed (a developer's machine), with a warning
    assert server_options("upscaler", load_settings("upscaler"), env={})["mesh"] is None


def test_secrets_come_from_files_named_by_FILE_variables(tmp_path):
    f = tmp_path / "s3-secret"
    f.write_text("from-a-file\n")
    s = config.load(load_settings("gateway").__class__, "VIDEOMESH_GATEWAY_",
                    env={"VIDEOMESH_GATEWAY_S3_SECRET_KEY_FILE": str(f)})  # fmt: skip
    assert s.s3_secret_key == "from-a-file"
    with pytest.raises(config.ConfigError, match="VIDEOMESH_GATEWAY_WATERMARK_KEY_FILE"):
        config.load(
            s.__class__, "VIDEOMESH_GATEWAY_", env={"VIDEOMESH_GATEWAY_WATERMARK_KEY_FILE": str(f) + "x"}
        )


@pytest.mark.slow
def test_a_mesh_with_a_secret_generates_through_the_gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDEOMESH_MESH_SECRET", "the-mesh-secret")
    mesh = InProcessMesh(tmp_path)
    try:
        key = mesh.tenants.add("acme", "pro")
        with VideoClient(mesh.address, api_key=key) as c:
            spec = common_pb2.VideoSpec(prompt="a small red ball moves to the right", seed=3)
            events = list(c.generate(spec, timeout=120))
        assert events[-1].WhichOneof("event") == "completed", events[-1]
        # every stage ran with the credential: no downstream refused a call
        assert all(mesh.servers[n].mesh_auth is not None for n in INTERNAL)
        assert sum(mesh.servers[n].mesh_auth.refused for n in INTERNAL) == 0
    finally:
        mesh.stop()
