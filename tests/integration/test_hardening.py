"""Regression tests for the hardening issue's gateway items: offered sizes end to end, the result
cache's scope, cancellation that is durable and immediate, bounded downstream calls, recovery that
waits for SERVING, downloads, and the out-of-world warning."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent import futures

import grpc
import pytest

from gateway.pipeline import Downstreams
from tests.helpers import InProcessMesh
from videomesh.client import VideoClient
from videomesh.errors import Unavailable, details_of
from videomesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, upscaler_pb2_grpc

pytestmark = pytest.mark.slow

PROMPT = "a small red ball moves to the right on a black background"


def spec(steps=2, **kw):
    base = dict(prompt=PROMPT, seed=7, num_steps=steps)
    base.update(kw)
    return common_pb2.VideoSpec(**base)


def wait_status(client, vid, statuses, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get(vid)
        if v.status in statuses:
            return v
        time.sleep(0.05)
    raise AssertionError(f"{vid} still {common_pb2.VideoStatus.Name(v.status)}")


DONE = (common_pb2.SUCCEEDED, common_pb2.FAILED, common_pb2.CANCELLED, common_pb2.NEEDS_REVIEW)


# --- 1. every offered size works end to end ---------------------------------------------------


def test_every_offered_size_end_to_end(tmp_path):
    # the gateway's own defaults: 256x256, 128x128 and 512x512 (a 512x512 frame fills a chunk alone,
    # which the QC feed used to drop: "chunk for frame 4 arrived, expected frame 1")
    mesh = InProcessMesh(tmp_path, gateway={"sizes": ("256x256", "128x128", "512x512"),
                                            "default_size": "256x256", "fps_choices": (8.0,), "default_fps": 8.0})  # fmt: skip
    try:
        key = mesh.tenants.add("sizes", "pro")
        with VideoClient(mesh.address, key) as c:
            for size in ("128x128", "256x256", "512x512"):
                w, h = map(int, size.split("x"))
                v = c.create(spec(width=w, height=h))
                v = wait_status(c, v.id, DONE, timeout=300)
                assert v.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW), (size, v.error)
                assert (v.result.width, v.result.height) == (w, h)
                assert len(v.quality.checks) > 1  # QC saw the frames
    finally:
        mesh.stop()


def test_a_downstream_refusing_the_gateway_is_not_the_users_fault(mesh, keys):
    """A downstream INVALID_ARGUMENT about what the gateway sent is recorded as an internal failure."""
    pipeline = mesh.gateway.pipeline
    original = pipeline._run

    class Refused(grpc.RpcError):
        stage = "qc"

        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return "frames: chunk for frame 4 arrived, expected frame 1"

    def refuse(*a, **kw):
        raise Refused()

    pipeline._run = refuse
    try:
        with VideoClient(mesh.address, keys["alice"]) as c:
            v = wait_status(c, c.create(spec(seed=101)).id, DONE)
    finally:
        pipeline._run = original
    assert v.status == common_pb2.FAILED
    assert v.error.code == grpc.StatusCode.INTERNAL.value[0] and v.error.reason == "DOWNSTREAM_REJECTED"
    assert "qc service refused" in v.error.message


# --- 2. / 16. the result cache ------------------------------------------------------------------


def test_cache_is_per_tenant_and_keyed_on_the_marks(tmp_path):
    mesh = InProcessMesh(tmp_path)
    try:
        pro1, pro2 = mesh.tenants.add("pro1", "pro"), mesh.tenants.add("pro2", "pro")
        free = mesh.tenants.add("free1", "free")
        with VideoClient(mesh.address, pro1) as a:
            first = wait_status(a, a.create(spec(seed=11)).id, DONE)
            again = a.create(spec(seed=11))
            assert again.cached and again.status == common_pb2.SUCCEEDED  # the same tenant: a hit
            assert again.result.sha256 == first.result.sha256
        with VideoClient(mesh.address, pro2) as b:  # another tenant, same tier: no hit
            other = b.create(spec(seed=11))
            assert not other.cached
            other = wait_status(b, other.id, DONE)
        with VideoClient(mesh.address, free) as f:  # another tier: the visible mark changes the bytes
            fv = f.create(spec(seed=11))
            assert not fv.cached
            fv = wait_status(f, fv.id, DONE)
        assert fv.result.sha256 not in (first.result.sha256, other.result.sha256)
        # the key covers the marks: the free tier's visible mark, the watermark key
        gw = mesh.gateway
        norm = gw.normalize(spec(seed=11))
        from gateway.tenants import Tenant

        keys = {gw.cache_key(norm, Tenant("t", "pro")), gw.cache_key(norm, Tenant("t", "free")),
                gw.cache_key(norm, Tenant("u", "pro"))}  # fmt: skip
        assert len(keys) == 3
    finally:
        mesh.stop()


def test_public_templates_are_shared_between_tenants_with_the_same_marks(tmp_path):
    mesh = InProcessMesh(tmp_path)
    try:
        k1, k2 = mesh.tenants.add("t1", "pro"), mesh.tenants.add("t2", "pro")
        tid = next(iter(mesh.gateway.templates.templates))
        fields = {
            f.name: (f.choices[0] if f.choices else "x")
            for f in mesh.gateway.templates.get(tid).proto().fields
        }
        over = common_pb2.VideoSpec(num_steps=2)
        with VideoClient(mesh.address, k1) as a:
            v1 = wait_status(a, a.create_from_template(tid, fields, over).id, DONE)
        with VideoClient(mesh.address, k2) as b:
            v2 = b.create_from_template(tid, fields, over)
        assert v1.status == common_pb2.SUCCEEDED and v2.cached and v2.result.sha256 == v1.result.sha256
    finally:
        mesh.stop()


def test_cache_hits_are_rate_limited(tmp_path):
    mesh = InProcessMesh(tmp_path, gateway={"tiers": {"free": {"burst": 3, "rate_per_minute": 1}}})
    try:
        key = mesh.tenants.add("burst", "free")
        with VideoClient(mesh.address, key) as c:
            wait_status(c, c.create(spec(seed=5)).id, DONE)
            codes = []
            for _ in range(10):
                try:
                    codes.append("ok" if c.create(spec(seed=5)).cached else "miss")
                except grpc.RpcError as e:
                    codes.append(details_of(e).get("reason"))
        assert codes.count("RATE_LIMITED") >= 8, codes  # the burst of 3 was spent on the first + 2 hits
        assert set(codes) <= {"ok", "RATE_LIMITED"}, codes
    finally:
        mesh.stop()


# --- 13. cancellation is durable and immediate ------------------------------------------------------


def test_cancel_is_durable_at_once_and_survives_a_crash(tmp_path):
    mesh = InProcessMesh(tmp_path, gateway={"workers": 1})
    try:
        key = mesh.tenants.add("c", "pro")
        with VideoClient(mesh.address, key) as c:
            running = c.create(spec(steps=40, seed=1))
            queued = c.create(spec(steps=40, seed=2))
            wait_status(c, running.id, (common_pb2.RUNNING,))
            # a worker that cannot react before the crash: its cancel does nothing
            with mesh.gateway.runner.lock:
                ctl = mesh.gateway.runner.controls[running.id]
            ctl.cancel = lambda *a, **k: None
            # the queued one first: once the running one is cancelled its attempt stops at its next
            # write (refused: the job is no longer RUNNING) and the worker would take the queued one
            assert c.cancel(queued.id).status == common_pb2.CANCELLED
            t0 = time.monotonic()
            v = c.cancel(running.id)
            assert time.monotonic() - t0 < 5
            assert v.status == common_pb2.CANCELLED
        mesh.restart_gateway()  # a crash: the old worker's attempt is abandoned
        with VideoClient(mesh.address, key) as c:
            time.sleep(2)
            for vid in (running.id, queued.id):
                after = c.get(vid)
                assert after.status == common_pb2.CANCELLED, vid
            assert c.get(running.id).attempt == 1 and c.get(queued.id).attempt == 0
    finally:
        mesh.stop()


# --- 12. bounded downstream calls -----------------------------------------------------------------


class _SilentDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    """Accepts a Denoise call and never answers (until the call ends)."""

    def __init__(self):
        self.started = threading.Event()

    def Denoise(self, request, context):
        self.started.set()
        while context.is_active():
            time.sleep(0.05)
        return
        yield


def test_a_stream_whose_server_dies_before_replying_fails_fast():
    silent = _SilentDenoiser()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    denoiser_pb2_grpc.add_DenoiserServicer_to_server(silent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ds = Downstreams("127.0.0.1:1", f"127.0.0.1:{port}", "127.0.0.1:1", "127.0.0.1:1")
    outcome = {}

    def consume():
        try:
            list(ds.denoiser.Denoise(denoiser_pb2.DenoiseRequest(request_id="x")))
            outcome["code"] = "OK"
        except grpc.RpcError as e:
            outcome["code"] = e.code()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert silent.started.wait(5)
    server.stop(0)  # the denoiser dies before its first reply
    t.join(10)
    ds.close()
    assert not t.is_alive(), "the streaming call never returned"
    assert outcome["code"] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class _SilentUpscaler(upscaler_pb2_grpc.UpscalerServicer):
    def Upscale(self, request_iterator, context):
        while context.is_active():
            time.sleep(0.05)
        return
        yield


def test_a_silent_stage_is_stopped_and_cancel_is_immediate(tmp_path):
    mesh = InProcessMesh(tmp_path, gateway={"workers": 1, "stall_timeout": 1.5, "max_attempts": 1})
    try:
        # the upscaler hangs: it accepts the stream and never answers
        up = mesh.servers["upscaler"]
        port = up.port
        up.stop(0)
        server = grpc.server(futures.ThreadPoolExecutor(8))
        upscaler_pb2_grpc.add_UpscalerServicer_to_server(_SilentUpscaler(), server)
        # healthy by its health service, as every videomesh server is (the gateway's channels send calls
        # only to replicas whose health is SERVING)
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        hs = health.HealthServicer()
        for name in ("", "videomesh.v1.Upscaler"):
            hs.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
        deadline = time.monotonic() + 20  # the gateway's channel has found the new server
        while (
            mesh.gateway.downstreams.status("upscaler", max_age=0) != health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline, "the gateway never saw the replacement upscaler"
            time.sleep(0.1)
        key = mesh.tenants.add("hang", "pro")
        with VideoClient(mesh.address, key) as c:
            t0 = time.monotonic()
            v = wait_status(c, c.create(spec(seed=3)).id, DONE, timeout=60)
            assert v.status == common_pb2.FAILED and v.error.code == grpc.StatusCode.UNAVAILABLE.value[0], (
                v.error
            )
            assert "sent nothing" in v.error.message and time.monotonic() - t0 < 30
        server.stop(0)
    finally:
        mesh.stop()


def test_gateway_health_turns_not_serving_when_every_worker_is_wedged(mesh):
    gw = mesh.gateway
    from gateway.pipeline import JobControl

    stuck = [JobControl(report=lambda *a: None, stage=lambda s: None) for _ in range(gw.workers)]
    for c in stuck:
        c.last_activity -= 3 * gw.settings.stall_timeout
    assert not gw.wedged()
    with gw.runner.lock:
        for i, c in enumerate(stuck):
            gw.runner.controls[f"vid_stuck{i}"] = c
    try:
        assert gw.wedged()
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 10
        with grpc.insecure_channel(mesh.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="videomesh.v1.VideoService")
            while stub.Check(req, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health stayed SERVING"
                time.sleep(0.2)
    finally:
        with gw.runner.lock:
            for i in range(len(stuck)):
                gw.runner.controls.pop(f"vid_stuck{i}", None)


# --- 3. restarts: not-ready services answer UNAVAILABLE; recovery waits for SERVING -------------------


def test_an_encoder_that_is_still_loading_answers_unavailable_with_a_delay():
    from services.encoder.encoder import EncoderSettings, TextEncoding

    with pytest.raises(Unavailable) as e:
        TextEncoding(EncoderSettings(model="tiny")).encode(["a red ball"])
    assert e.value.retry_after and e.value.retry_after > 0


def test_recovery_waits_until_every_downstream_is_serving(tmp_path):
    mesh = InProcessMesh(tmp_path, gateway={"workers": 1})
    try:
        key = mesh.tenants.add("r", "pro")
        with VideoClient(mesh.address, key) as c:
            vid = c.create(spec(steps=30, seed=9)).id
            wait_status(c, vid, (common_pb2.RUNNING,))
        encoder = mesh.servers["encoder"]
        encoder.set_serving(False)  # as after a restart: the encoder is still loading
        mesh.restart_gateway()
        with VideoClient(mesh.address, key) as c:
            time.sleep(3)
            v = c.get(vid)
            assert not mesh.gateway.recovered.is_set()
            assert v.status in (common_pb2.RUNNING, common_pb2.QUEUED) and v.attempt == 1, v
            encoder.set_serving(True)
            v = wait_status(c, vid, DONE)
        assert v.status == common_pb2.SUCCEEDED and v.attempt == 2
    finally:
        mesh.stop()


# --- 10. downloads -------------------------------------------------------------------------------------


def test_download_streams_the_file_with_a_checksum_trailer(mesh, keys):
    with VideoClient(mesh.address, keys["alice"]) as c:
        v = wait_status(c, c.create(spec(seed=21)).id, DONE)
        parts = list(
            c.stub.DownloadVideo(gateway_pb2.DownloadVideoRequest(id=v.id), metadata=c._metadata, timeout=30)
        )
    data = b"".join(p.chunk for p in parts[:-1])
    trailer = parts[-1].trailer
    assert parts[-1].WhichOneof("part") == "trailer"
    assert trailer.sha256 == hashlib.sha256(data).hexdigest() == v.result.sha256
    assert trailer.size_bytes == len(data) == v.result.size_bytes
    with VideoClient(mesh.address, keys["bob"]) as other:  # another tenant's video does not exist for bob
        with pytest.raises(grpc.RpcError) as e:
            list(other.stub.DownloadVideo(gateway_pb2.DownloadVideoRequest(id=v.id), metadata=other._metadata,
                                          timeout=30))  # fmt: skip
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


# --- 11. prompts outside the default model's world ------------------------------------------------------


def test_a_prompt_naming_nothing_the_model_knows_gets_a_warning(mesh, keys):
    with VideoClient(mesh.address, keys["alice"]) as c:
        events = list(c.generate(spec(prompt="a girl jogging in a park at dawn", seed=31)))
        known = list(c.generate(spec(seed=32)))
    warnings = [e.warning for e in events if e.WhichOneof("event") == "warning"]
    assert len(warnings) == 1 and warnings[0].reason == "PROMPT_OUTSIDE_MODEL_WORLD"
    assert "balls, boxes and triangles" in warnings[0].message
    assert events[-1].completed.video.warnings == [warnings[0].message]
    assert not [e for e in known if e.WhichOneof("event") == "warning"]


def test_a_stream_ending_late_does_not_cancel_a_job_held_for_review(mesh, keys):
    """cancel_quietly (a GenerateVideo stream gone) only ends queued or running jobs."""
    with VideoClient(mesh.address, keys["alice"]) as c:
        v = wait_status(c, c.create(spec(seed=41)).id, DONE)
    mesh.gateway.store.update(v.id, lambda x: setattr(x, "status", common_pb2.NEEDS_REVIEW))
    mesh.gateway.cancel_quietly(v.id, "the GenerateVideo stream ended")
    assert mesh.gateway.store.load(v.id).video.status == common_pb2.NEEDS_REVIEW


def test_a_template_filled_with_a_tenants_own_words_is_not_shared(mesh):
    """Only renderings made of the library's own words (choices, defaults) share a cache key."""
    from gateway.tenants import Tenant

    gw = mesh.gateway
    a, b = Tenant("a1", "pro"), Tenant("a2", "pro")

    def keys(template_id, fields):
        t = gw.templates.get(template_id)
        spec = gw.normalize(common_pb2.VideoSpec(prompt=t.render(fields), style=t.style, seed=3))
        return gw.cache_key(spec, a, template_id), gw.cache_key(spec, b, template_id)

    secret = keys("product_intro", {"product": "the unreleased acme phone x"})
    public = keys("shape_showcase", {"color": "blue", "shape": "box"})
    holiday = keys("holiday_greeting", {"holiday": "Diwali"})  # free-text field left at its default
    custom = keys("holiday_greeting", {"holiday": "Diwali", "scene": "our new flagship store"})
    assert secret[0] != secret[1] and custom[0] != custom[1]
    assert public[0] == public[1] and holiday[0] == holiday[1]


def test_a_failing_attempt_does_not_revive_a_cancelled_job(mesh, keys):
    """The retry path's requeue is refused inside its transaction once the job was cancelled."""
    with VideoClient(mesh.address, keys["alice"]) as c:
        v = wait_status(c, c.create(spec(seed=51)).id, DONE)
    gw = mesh.gateway
    gw.store.update(v.id, lambda x: setattr(x, "status", common_pb2.RUNNING))  # an attempt in flight
    gw.runner.finish_cancelled(v.id, "cancelled by request")  # the user cancels while it fails
    assert gw.runner.requeue(v.id) is False  # the failing attempt tries to queue it again
    assert gw.store.load(v.id).video.status == common_pb2.CANCELLED
    events = gw.store.wait_events(v.id, 0, timeout=0.1)
    assert events[-1].WhichOneof("event") == "cancelled"


def test_a_service_still_loading_does_not_spend_the_jobs_attempts(tmp_path):
    """During a supervised restart a service answers NOT_READY for as long as its model loads:
    the job waits without spending attempts (max_attempts 1 here) and then succeeds."""
    mesh = InProcessMesh(tmp_path, gateway={"workers": 1, "max_attempts": 1})
    try:
        key = mesh.tenants.add("w", "pro")
        encoder = mesh.servers["encoder"]
        encoder.loaded.clear()  # as after a restart: Encode answers UNAVAILABLE NOT_READY
        with VideoClient(mesh.address, key) as c:
            vid = c.create(spec(seed=61)).id
            time.sleep(5)  # two or more NOT_READY attempts
            v = c.get(vid)
            assert v.status in (common_pb2.QUEUED, common_pb2.RUNNING), v.error
            encoder.loaded.set()
            v = wait_status(c, vid, DONE)
        assert v.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW), v.error
        assert v.attempt == 1
    finally:
        mesh.stop()
