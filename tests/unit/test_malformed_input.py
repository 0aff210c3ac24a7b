"""Malformed and hostile input is INVALID_ARGUMENT with a field violation, never INTERNAL, and
costs no more than the bytes sent (issue 18, items 17 and 18). tests/services/test_fuzz.py
fuzzes every RPC; these are the cases that were found, one by one."""

from __future__ import annotations

import subprocess
import time
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from tests.helpers import InProcessMesh, start_service
from videomesh import codec
from videomesh.errors import InvalidArgument, details_of
from videomesh.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    gateway_pb2,
    qc_pb2,
    qc_pb2_grpc,
    upscaler_pb2,
    upscaler_pb2_grpc,
)

U8 = common_pb2.DTYPE_UINT8


def _invalid(call, field_prefix: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    err = e.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    fields = [f for f, _ in details_of(err).get("violations", [])]
    assert any(f.startswith(field_prefix) for f in fields), (fields, err.details())
    return err


# --- codec --------------------------------------------------------------------------------------


def test_unknown_dtype_is_invalid_argument_in_expect_too():
    msg = common_pb2.Tensor(dtype=99, shape=[1, 2, 32], data=b"\0" * 64)
    with pytest.raises(InvalidArgument) as e:
        codec.expect(msg, name="text_embeddings", dtypes=[common_pb2.DTYPE_FLOAT32], ndim=3)
    assert e.value.violations[0][0] == "text_embeddings.dtype" and "99" in e.value.message


@pytest.mark.parametrize(
    "shape,data",
    [
        ([1, 2**32, 2**32], b""),  # the int64 product wraps to 0: "0 bytes needed", then reshape fails
        ([2**32, 2**32, 1], b""),
        ([0, 2**62, 2**62], b""),  # empty, yet numpy cannot even describe it
        ([1] * 100, b"\0"),  # numpy allows at most 64 dimensions
        ([2**63 - 1], b""),
    ],
)
def test_absurd_shapes_are_invalid_argument(shape, data):
    msg = common_pb2.Tensor(dtype=U8, shape=shape, data=data)
    for decode in (codec.to_numpy, codec.to_torch):
        with pytest.raises(InvalidArgument) as e:
            decode(msg, name="pixels")
        assert e.value.violations[0][0].startswith("pixels.")


def test_real_shapes_still_decode():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(codec.to_numpy(codec.to_proto(a)), a)
    empty = np.zeros((0, 64, 64, 3), np.uint8)
    assert codec.to_numpy(codec.to_proto(empty)).shape == (0, 64, 64, 3)


def _chunk(shape, frame_height=0, row_offset=0, frame_index=0) -> common_pb2.FrameChunk:
    px = codec.to_proto(np.zeros(shape, np.uint8))
    return common_pb2.FrameChunk(
        frame_index=frame_index, row_offset=row_offset, frame_height=frame_height, pixels=px
    )


@pytest.mark.parametrize("shape", [(1, 0, 16, 3), (1, 16, 0, 3), (0, 16, 16, 3)])
def test_assembler_rejects_a_zero_dimension(shape):
    with pytest.raises(InvalidArgument) as e:
        codec.FrameAssembler().add(_chunk(shape))
    assert e.value.violations[0][0] == "frames.pixels.shape"


@pytest.mark.parametrize("height", [2**31 - 1, 4097, -5, 4])
def test_assembler_rejects_absurd_declared_height_before_allocating(height):
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument) as e:
            codec.FrameAssembler().add(_chunk((1, 8, 16, 3), frame_height=height))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.violations[0][0] == "frames.frame_height"
    assert peak < 1 << 20, f"allocated {peak} bytes for a chunk of 384 bytes"


def test_assembler_memory_follows_the_bytes_sent_not_the_declared_height():
    """A frame declared 4096 rows tall, of which one band of 1 row arrives: nothing is allocated
    for the 4095 rows that never come (the old assembler allocated the whole frame up front)."""
    asm = codec.FrameAssembler()
    tracemalloc.start()
    try:
        assert asm.add(_chunk((1, 1, 4096, 3), frame_height=4096)) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert asm.partial and peak < 4 << 20, f"{peak} bytes allocated for a 12 KB band"


def test_assembler_still_joins_bands_into_frames():
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 24, 3), dtype=np.uint8)
    chunks = list(codec.frame_chunks(frames, max_bytes=24 * 3 * 7))  # bands of 7 rows
    assert len(chunks) > 2 and chunks[0].frame_height == 40
    np.testing.assert_array_equal(codec.assemble(chunks), frames)


# --- services over real channels ------------------------------------------------------------------


@pytest.fixture(scope="module")
def services():
    started = {
        "encoder": start_service("encoder", model="tiny"),
        "denoiser": start_service("denoiser", model="tiny"),
        "qc": start_service("qc"),
        "upscaler": start_service("upscaler"),
    }
    yield {n: s for n, (s, _) in started.items()}
    for _, stop in started.values():
        stop()


def test_request_bytes_that_are_not_protobuf_are_invalid_argument(services):
    bad = b"\xff\xff\xff"
    with grpc.insecure_channel(services["encoder"].address) as ch:
        encode = ch.unary_unary("/videomesh.v1.TextEncoder/Encode", request_serializer=None)
        err = _invalid(lambda: encode(bad, timeout=10), "request")
        assert "videomesh.v1.EncodeRequest" in err.details()
        health = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None)
        _invalid(lambda: health(bad, timeout=10), "request")  # every service of the server
    with grpc.insecure_channel(services["qc"].address) as ch:  # stream -> unary: abort when it is read
        inspect = ch.stream_unary("/videomesh.v1.QualityCheck/Inspect", request_serializer=None)
        first = qc_pb2.InspectRequest(settings=qc_pb2.InspectSettings(fps=8)).SerializeToString()
        _invalid(lambda: inspect(iter([first, bad]), timeout=10), "request")
    with grpc.insecure_channel(services["upscaler"].address) as ch:  # stream -> stream
        upscale = ch.stream_stream("/videomesh.v1.Upscaler/Upscale", request_serializer=None)
        _invalid(lambda: list(upscale(iter([bad]), timeout=10)), "request")
    with grpc.insecure_channel(services["denoiser"].address) as ch:  # unary -> stream
        denoise = ch.unary_stream("/videomesh.v1.Denoiser/Denoise", request_serializer=None)
        _invalid(lambda: list(denoise(bad, timeout=10)), "request")
    # invalid UTF-8 in a string field is a parse error too
    with grpc.insecure_channel(services["encoder"].address) as ch:
        encode = ch.unary_unary("/videomesh.v1.TextEncoder/Encode", request_serializer=None)
        _invalid(lambda: encode(b"\x0a\x02\xc3\x28", timeout=10), "request")


def _inspect(address, chunks, **settings):
    reqs = [qc_pb2.InspectRequest(settings=qc_pb2.InspectSettings(**settings))]
    reqs += [qc_pb2.InspectRequest(frames=c) for c in chunks]
    with grpc.insecure_channel(address) as ch:
        return qc_pb2_grpc.QualityCheckStub(ch).Inspect(iter(reqs), timeout=20)


MALFORMED_CHUNKS = {
    "dtype 99": (
        common_pb2.FrameChunk(pixels=common_pb2.Tensor(dtype=99, shape=[1, 16, 16, 3], data=bytes(768))),
        "frames.pixels.dtype",
    ),
    "element count overflows": (
        common_pb2.FrameChunk(pixels=common_pb2.Tensor(dtype=U8, shape=[1, 2**32, 2**32])),
        "frames.pixels.shape",
    ),
    "zero dimension": (_chunk((1, 0, 16, 3)), "frames.pixels.shape"),
    "100 dimensions": (
        common_pb2.FrameChunk(pixels=common_pb2.Tensor(dtype=U8, shape=[1] * 100, data=b"\0")),
        "frames.pixels.shape",
    ),
    "frame_height 2**31-1": (_chunk((1, 8, 16, 3), frame_height=2**31 - 1), "frames.frame_height"),
}


@pytest.mark.parametrize("case", list(MALFORMED_CHUNKS))
def test_qc_rejects_malformed_chunks(services, case):
    chunk, field = MALFORMED_CHUNKS[case]
    t0 = time.monotonic()
    _invalid(lambda: _inspect(services["qc"].address, [chunk], fps=8), field)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), float("-inf"), 1e30, -1.0])
def test_qc_rejects_fps_that_is_not_a_frame_rate(services, fps):
    frames = np.full((4, 16, 16, 3), 128, np.uint8)
    err = _invalid(
        lambda: _inspect(services["qc"].address, codec.frame_chunks(frames), fps=fps), "settings.fps"
    )
    assert "240" in err.details()  # names the bound


def test_qc_rejects_absurd_total_frames(services):
    frames = np.full((4, 16, 16, 3), 128, np.uint8)
    _invalid(
        lambda: _inspect(services["qc"].address, codec.frame_chunks(frames), fps=8, total_frames=-1),
        "settings.total_frames",
    )


def test_denoiser_rejects_unknown_dtype(services):
    text = codec.to_proto(torch.randn(1, 5, 32))
    mask = codec.to_proto(torch.ones(1, 5, dtype=torch.bool))
    bad = common_pb2.Tensor(dtype=99, shape=[1, 5, 32], data=text.data)
    req = denoiser_pb2.DenoiseRequest(
        text_embeddings=bad, text_mask=mask, negative_embeddings=text, negative_mask=mask, num_steps=1
    )
    with grpc.insecure_channel(services["denoiser"].address) as ch:
        stub = denoiser_pb2_grpc.DenoiserStub(ch)
        _invalid(lambda: list(stub.Denoise(req, timeout=20)), "text_embeddings.dtype")


@pytest.mark.parametrize(
    "case,field",
    [("nan", "text_embeddings.data"), ("inf", "text_embeddings.data"), ("no real token", "text_mask.data"),
     ("no tokens", "text_mask.data")],
)  # fmt: skip
def test_denoiser_rejects_embeddings_no_encoder_makes(services, case, field):
    """These used to come back OK, as black frames with no word of why."""
    length = 0 if case == "no tokens" else 5
    text = torch.full((1, length, 32), {"nan": float("nan"), "inf": float("inf")}.get(case, 0.5))
    mask = torch.full((1, length), case != "no real token", dtype=torch.bool)
    good = codec.to_proto(torch.full((1, 5, 32), 0.5))
    good_mask = codec.to_proto(torch.ones(1, 5, dtype=torch.bool))
    req = denoiser_pb2.DenoiseRequest(text_embeddings=codec.to_proto(text), text_mask=codec.to_proto(mask),
                                      negative_embeddings=good, negative_mask=good_mask, num_steps=1)  # fmt: skip
    with grpc.insecure_channel(services["denoiser"].address) as ch:
        stub = denoiser_pb2_grpc.DenoiserStub(ch)
        _invalid(lambda: list(stub.Denoise(req, timeout=20)), field)


def _upscale(address, frames, **settings):
    reqs = [upscaler_pb2.UpscaleRequest(settings=upscaler_pb2.UpscaleSettings(**settings))]
    reqs += [upscaler_pb2.UpscaleRequest(frames=c) for c in codec.frame_chunks(frames)]
    with grpc.insecure_channel(address) as ch:
        return codec.assemble(list(upscaler_pb2_grpc.UpscalerStub(ch).Upscale(iter(reqs), timeout=30)))


def test_upscale_to_8x8_with_interpolation_is_a_clear_error(services):
    """OpenCV's DIS optical flow refuses frames under 8 px a side or 12 px on both: that was an
    INTERNAL from deep in the interpolator. Now the settings are refused up front."""
    addr = services["upscaler"].address
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    common = dict(input_frames=3, input_fps=4, output_fps=8)
    err = _invalid(
        lambda: _upscale(addr, frames, output_width=8, output_height=8, output_frames=5, **common),
        "settings.output_width",
    )
    assert "interpolation" in err.details() and "12" in err.details()
    _invalid(lambda: _upscale(addr, frames, output_width=64, output_height=4, output_frames=5, **common),
             "settings.output_width")  # fmt: skip
    # what does work: 8x8 without in-between frames, and interpolation from 12 px (or 8x12) up
    assert _upscale(addr, frames, output_width=8, output_height=8, output_frames=3, **common).shape == (
        3,
        8,
        8,
        3,
    )
    assert _upscale(addr, frames, output_width=12, output_height=8, output_frames=5, **common).shape == (
        5,
        8,
        12,
        3,
    )


@pytest.mark.parametrize("name", ["input_fps", "output_fps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_upscaler_rejects_non_finite_fps(services, name, value):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    settings = dict(
        input_frames=2, input_fps=4, output_width=32, output_height=32, output_frames=2, output_fps=8
    )
    settings[name] = value
    _invalid(lambda: _upscale(services["upscaler"].address, frames, **settings), f"settings.{name}")


def test_services_still_serve_after_the_malformed_input(services):
    frames = np.random.default_rng(1).integers(60, 200, (6, 32, 32, 3), dtype=np.uint8)
    assert _inspect(services["qc"].address, codec.frame_chunks(frames), fps=8).frames_inspected == 6


# --- the gateway ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    mesh = InProcessMesh(tmp_path_factory.mktemp("malformed"))  # offers 64x64, 32x32, 48x64
    key = mesh.tenants.add("tester", "pro")
    from videomesh.v1 import gateway_pb2_grpc

    ch = grpc.insecure_channel(mesh.address)
    stub = gateway_pb2_grpc.VideoServiceStub(ch)
    yield stub, [("authorization", f"Bearer {key}")], mesh
    ch.close()
    mesh.stop()


@pytest.mark.parametrize(
    "token", ["9223372036854775808", "99999999999999999999999", "+1", "1_0", "١", " 1", "-1"]
)
def test_list_videos_refuses_page_tokens_it_never_issued(gateway, token):
    stub, md, _ = gateway
    _invalid(
        lambda: stub.ListVideos(gateway_pb2.ListVideosRequest(page_token=token), metadata=md), "page_token"
    )


def test_list_videos_accepts_its_own_tokens(gateway):
    stub, md, _ = gateway
    assert stub.ListVideos(gateway_pb2.ListVideosRequest(page_token="0"), metadata=md) is not None
    assert not stub.ListVideos(gateway_pb2.ListVideosRequest(page_token="999999"), metadata=md).videos


def _clip(path: Path, size: str, frames: int) -> Path:
    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"color=c=red:s={size}:r=24", "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast",
         "-pix_fmt", "yuv420p", str(path)],
        check=True, timeout=120,
    )  # fmt: skip
    return path


def _verify(stub, md, path: Path):
    data = path.read_bytes()
    reqs = (
        gateway_pb2.VerifyWatermarkRequest(chunk=data[i : i + (1 << 20)])
        for i in range(0, len(data), 1 << 20)
    )
    return stub.VerifyWatermark(reqs, metadata=md, timeout=60)


def test_verify_watermark_refuses_huge_frames_before_decoding(gateway, tmp_path):
    """A solid-colour 4096x4096 clip compresses to a few KB a frame; decoding it cost 28.9 s of
    gateway CPU for 240 frames. Now the stream's header is read and the upload refused."""
    stub, md, _ = gateway
    clip = _clip(tmp_path / "huge.mp4", "4096x4096", 8)
    assert clip.stat().st_size < 200_000
    t0 = time.monotonic()
    err = _invalid(lambda: _verify(stub, md, clip), "chunk")
    assert time.monotonic() - t0 < 3, "the upload was decoded before it was refused"
    assert "4096x4096" in err.details() and "64x64" in err.details()  # the size and the limit


def test_verify_watermark_refuses_frames_larger_than_any_offered_size(gateway, tmp_path):
    stub, md, _ = gateway
    err = _invalid(lambda: _verify(stub, md, _clip(tmp_path / "wide.mp4", "128x64", 2)), "chunk")
    assert "64x64" in err.details()


def test_verify_watermark_decodes_a_bounded_number_of_frames(gateway, tmp_path):
    from gateway.media import MAX_VERIFY_FRAMES

    stub, md, _ = gateway
    r = _verify(stub, md, _clip(tmp_path / "long.mp4", "64x64", MAX_VERIFY_FRAMES * 4))
    assert r.frames == MAX_VERIFY_FRAMES and not r.present
    short = _verify(stub, md, _clip(tmp_path / "short.mp4", "48x32", 10))  # within every bound: as before
    assert short.frames == 10
