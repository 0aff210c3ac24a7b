"""Each service over a real channel on 127.0.0.1: health, reflection, validation errors."""

import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers import _settings, health_status, start_service
from videomesh import codec
from videomesh.client import channel
from videomesh.errors import details_of
from videomesh.launch import start
from videomesh.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    qc_pb2,
    qc_pb2_grpc,
    upscaler_pb2,
    upscaler_pb2_grpc,
)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = {
    "encoder": ("videomesh.v1.TextEncoder", {"model": "tiny"}),
    "denoiser": ("videomesh.v1.Denoiser", {"model": "tiny"}),
    "upscaler": ("videomesh.v1.Upscaler", {}),
    "qc": ("videomesh.v1.QualityCheck", {}),
}


@pytest.mark.parametrize("name", list(NAMES))
def test_health_goes_serving_after_load_and_reflection_lists_service(name):
    """The start-up every service process runs (launch.start): NOT_SERVING while it listens and loads,
    SERVING once loaded, set by the launcher, not by the test."""
    service, _ = NAMES[name]
    seen = {}

    def before_load(server, _close):
        seen["service"] = health_status(server.address, service)
        seen["overall"] = health_status(server.address, "")

    server, close = start(name, _settings(name, **NAMES[name][1]), before_load=before_load)
    try:
        assert seen == {"service": NOT_SERVING, "overall": NOT_SERVING}
        assert health_status(server.address, service) == SERVING
        assert health_status(server.address, "") == SERVING
        with grpc.insecure_channel(server.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(
                stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            )
            listed = {s.name for s in resp.list_services_response.service}
        assert service in listed and "grpc.health.v1.Health" in listed
    finally:
        server.stop(0)
        close()


def test_graceful_stop_says_not_serving_then_lets_calls_in_flight_finish():
    """Server.stop (what SIGTERM runs): a health watcher hears NOT_SERVING, and a call already in flight
    still completes within the grace period."""
    import threading

    from grpc_health.v1 import health_pb2_grpc

    server, close = start("qc", _settings("qc"))
    service = NAMES["qc"][0]
    ch = channel(server.address)
    try:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=20
        )
        assert next(watch).status == SERVING
        frames = np.random.default_rng(0).integers(60, 200, (8, 32, 32, 3), dtype=np.uint8)
        chunks = list(codec.frame_chunks(frames))
        release = threading.Event()

        def requests():
            yield qc_pb2.InspectRequest(settings=qc_pb2.InspectSettings(fps=8, total_frames=8))
            yield qc_pb2.InspectRequest(frames=chunks[0])
            release.wait(10)  # the rest only once the stop has begun
            for c in chunks[1:]:
                yield qc_pb2.InspectRequest(frames=c)

        in_flight = qc_pb2_grpc.QualityCheckStub(ch).Inspect.future(requests(), timeout=20)
        time.sleep(0.5)
        stopper = threading.Thread(target=server.stop, args=(5.0,))
        stopper.start()
        assert next(watch).status == NOT_SERVING  # told before the server goes away
        release.set()
        report = in_flight.result(timeout=10)  # drained, not cut off
        assert report.frames_inspected == 8
        stopper.join(10)
        assert not stopper.is_alive()
    finally:
        ch.close()
        server.stop(0)
        close()


@pytest.fixture(scope="module")
def services():
    started = {n: start_service(n, **kw) for n, (_, kw) in NAMES.items()}
    yield {n: s for n, (s, _) in started.items()}
    for _, stop in started.values():
        stop()


def _invalid(call, field_prefix: str):
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    info = details_of(e.value)
    assert info["reason"] == "INVALID_ARGUMENT"
    fields = [f for f, _ in info.get("violations", [])]
    assert any(f.startswith(field_prefix) for f in fields), (fields, e.value.details())
    assert "Traceback" not in e.value.details()
    return e.value


def test_encoder_encodes_and_rejects_bad_input(services):
    stub = encoder_pb2_grpc.TextEncoderStub(channel(services["encoder"].address))
    resp = stub.Encode(
        encoder_pb2.EncodeRequest(texts=["a red ball moves left", "黑色背景上一个红色的小球", ""])
    )
    emb = codec.to_numpy(resp.embeddings)
    mask = codec.to_numpy(resp.mask)
    assert emb.shape[0] == 3 and emb.shape[:2] == mask.shape and mask.dtype == bool
    assert list(resp.languages) == ["en", "zh", "en"] and resp.model.startswith("tiny@")
    _invalid(lambda: stub.Encode(encoder_pb2.EncodeRequest(texts=[])), "texts")
    _invalid(lambda: stub.Encode(encoder_pb2.EncodeRequest(texts=["x" * 5000])), "texts[0]")


def _denoise_request(**kw):
    text = torch.randn(1, 5, 32)
    mask = torch.ones(1, 5, dtype=torch.bool)
    base = dict(
        text_embeddings=codec.to_proto(text),
        text_mask=codec.to_proto(mask),
        negative_embeddings=codec.to_proto(text),
        negative_mask=codec.to_proto(mask),
        seed=3,
        num_steps=3,
    )
    base.update(kw)
    return denoiser_pb2.DenoiseRequest(**base)


def test_denoiser_streams_steps_then_frames(services):
    stub = denoiser_pb2_grpc.DenoiserStub(channel(services["denoiser"].address))
    info = stub.GetModelInfo(denoiser_pb2.GetModelInfoRequest())
    assert info.name == "tiny" and info.frame_counts == [4] and info.sizes[0].width == 16
    assert [e.name for e in info.experts] == ["high_noise", "low_noise"]
    events = list(stub.Denoise(_denoise_request()))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:3] == ["progress"] * 3 and kinds[-1] == "done" and "frames" in kinds
    assert [e.progress.step for e in events[:3]] == [1, 2, 3]
    frames = codec.assemble([e.frames for e in events if e.WhichOneof("event") == "frames"])
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8
    # same seed -> same frames
    again = codec.assemble(
        [e.frames for e in stub.Denoise(_denoise_request()) if e.WhichOneof("event") == "frames"]
    )
    np.testing.assert_array_equal(frames, again)


def test_denoiser_rejects_bad_tensors_and_sizes(services):
    stub = denoiser_pb2_grpc.DenoiserStub(channel(services["denoiser"].address))
    wrong_dim = codec.to_proto(torch.randn(1, 5, 7))
    _invalid(lambda: list(stub.Denoise(_denoise_request(text_embeddings=wrong_dim))), "text_embeddings")
    wrong_dtype = codec.to_proto(np.zeros((1, 5, 32), np.int32))
    _invalid(lambda: list(stub.Denoise(_denoise_request(text_embeddings=wrong_dtype))), "text_embeddings")
    wrong_mask = codec.to_proto(np.ones((1, 5), np.float32))
    _invalid(lambda: list(stub.Denoise(_denoise_request(text_mask=wrong_mask))), "text_mask")
    _invalid(lambda: list(stub.Denoise(_denoise_request(height=-16))), "height")
    _invalid(lambda: list(stub.Denoise(_denoise_request(width=24, height=24))), "width")
    _invalid(lambda: list(stub.Denoise(_denoise_request(num_frames=7))), "num_frames")
    _invalid(lambda: list(stub.Denoise(_denoise_request(num_steps=1000))), "num_steps")


def test_denoiser_rejects_mismatched_encoder(services):
    stub = denoiser_pb2_grpc.DenoiserStub(channel(services["denoiser"].address))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Denoise(_denoise_request(encoder_model="default@abc")))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(e.value)["reason"] == "ENCODER_MISMATCH"


def _upscale(stub, frames, **settings):
    reqs = [upscaler_pb2.UpscaleRequest(settings=upscaler_pb2.UpscaleSettings(**settings))]
    reqs += [upscaler_pb2.UpscaleRequest(frames=c) for c in codec.frame_chunks(frames)]
    return list(stub.Upscale(iter(reqs)))


def test_upscaler_streams_exact_frame_count_in_order(services):
    stub = upscaler_pb2_grpc.UpscalerStub(channel(services["upscaler"].address))
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    out = _upscale(
        stub,
        frames,
        input_frames=5,
        input_fps=4,
        output_width=64,
        output_height=48,
        output_frames=13,
        output_fps=12,
    )
    assert [c.frame_index for c in out] == sorted(c.frame_index for c in out)
    video = codec.assemble(out)
    assert video.shape == (13, 48, 64, 3)
    # first and last output frames are the (upscaled) first and last input frames
    from services.upscaler.upscaler import SpatialUpscaler, UpscalerSettings

    sr = SpatialUpscaler(UpscalerSettings())
    sr.load()
    assert sr.name.startswith("learned-x8@")  # the default serves the shipped network, not bicubic
    np.testing.assert_array_equal(video[0], sr(frames[0], 64, 48))
    np.testing.assert_array_equal(video[-1], sr(frames[-1], 64, 48))


def test_upscaler_rejects_bad_settings(services):
    stub = upscaler_pb2_grpc.UpscalerStub(channel(services["upscaler"].address))
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    _invalid(
        lambda: _upscale(stub, frames, input_frames=0, input_fps=4, output_width=16, output_height=16),
        "settings.input_frames",
    )
    _invalid(
        lambda: _upscale(stub, frames, input_frames=2, input_fps=4, output_width=-16, output_height=16),
        "settings.output_width",
    )
    _invalid(
        lambda: _upscale(stub, frames, input_frames=3, input_fps=4, output_width=16, output_height=16),
        "frames",
    )
    _invalid(
        lambda: list(
            stub.Upscale(iter([upscaler_pb2.UpscaleRequest(frames=next(codec.frame_chunks(frames)))]))
        ),
        "settings",
    )


def _inspect(stub, frames, **settings):
    reqs = [qc_pb2.InspectRequest(settings=qc_pb2.InspectSettings(**settings))]
    reqs += [qc_pb2.InspectRequest(frames=c) for c in codec.frame_chunks(frames)]
    return stub.Inspect(iter(reqs))


def test_qc_reports_black_frames_and_rejects_empty(services):
    stub = qc_pb2_grpc.QualityCheckStub(channel(services["qc"].address))
    rng = np.random.default_rng(0)
    frames = rng.integers(60, 200, (12, 32, 32, 3), dtype=np.uint8)
    report = _inspect(stub, frames, fps=8, expect_motion=True)
    assert report.passed and report.frames_inspected == 12
    frames[4:6] = 0
    report = _inspect(stub, frames, fps=8, expect_motion=True)
    black = next(c for c in report.checks if c.name == "black_frames")
    assert not report.passed and not black.passed
    assert [(r.start, r.end) for r in black.frames] == [(4, 6)]
    _invalid(lambda: _inspect(stub, frames[:0].reshape(0, 32, 32, 3), fps=8), "frames")
    _invalid(lambda: _inspect(stub, frames, fps=0), "settings.fps")


def test_denoiser_step_cache_counts_and_range(services):
    stub = denoiser_pb2_grpc.DenoiserStub(channel(services["denoiser"].address))
    done = [e.done for e in stub.Denoise(_denoise_request(num_steps=8)) if e.WhichOneof("event") == "done"][0]
    assert (done.steps_computed, done.steps_reused) == (8, 0)
    events = list(stub.Denoise(_denoise_request(num_steps=8, step_cache=1.0)))
    done = events[-1].done
    assert done.steps_reused > 0 and done.steps_computed + done.steps_reused == 8
    assert [e.progress.step for e in events if e.WhichOneof("event") == "progress"] == list(range(1, 9))
    for bad in (-0.1, 1.5, float("nan")):
        _invalid(lambda b=bad: list(stub.Denoise(_denoise_request(step_cache=b))), "step_cache")
