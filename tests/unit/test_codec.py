import numpy as np
import pytest
import torch

from videomesh import codec
from videomesh.errors import InvalidArgument
from videomesh.v1 import common_pb2

SHAPES = [(), (0,), (1,), (3, 0, 2), (2, 3, 5), (1, 7, 11, 3)]
NP_DTYPES = [np.float32, np.float16, np.float64, np.uint8, np.int8, np.int32, np.int64, np.bool_]


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 50).astype(dtype)
    msg = codec.to_proto(a)
    back = codec.to_numpy(common_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == np.dtype(dtype) and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_big_endian_input_is_stored_little_endian():
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    msg = codec.to_proto(a)
    assert msg.data == np.arange(6, dtype="<i4").tobytes()
    np.testing.assert_array_equal(codec.to_numpy(msg), a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4), (1, 0, 3)])
def test_torch_round_trip_keeps_dtype(dtype, shape):
    t = (torch.randn(shape) * 10).to(dtype)
    back = codec.to_torch(codec.to_proto(t))
    assert back.dtype == dtype and tuple(back.shape) == tuple(shape)
    assert torch.equal(back, t)


def test_bfloat16_bits_exact_and_widened_for_numpy():
    t = torch.tensor([1.0, -2.5, 3.140625, 65280.0], dtype=torch.bfloat16)
    msg = codec.to_proto(t)
    assert msg.dtype == common_pb2.DTYPE_BFLOAT16 and len(msg.data) == 8
    np.testing.assert_array_equal(codec.to_numpy(msg), t.float().numpy())


def test_wrong_byte_count_is_invalid_argument():
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12)
    with pytest.raises(InvalidArgument) as e:
        codec.to_numpy(msg, name="x")
    assert e.value.violations[0][0] == "x.data"


def test_unspecified_dtype_and_negative_shape_rejected():
    with pytest.raises(InvalidArgument):
        codec.to_numpy(common_pb2.Tensor(shape=[1], data=b"\0"))
    with pytest.raises(InvalidArgument):
        codec.to_numpy(common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[-1], data=b""))


def test_expect_checks_dtype_and_rank():
    msg = codec.to_proto(np.zeros((1, 4, 8), np.float32))
    codec.expect(msg, name="t", dtypes=[common_pb2.DTYPE_FLOAT32], ndim=3)
    with pytest.raises(InvalidArgument, match="dimensions"):
        codec.expect(msg, name="t", dtypes=[common_pb2.DTYPE_FLOAT32], ndim=2)
    with pytest.raises(InvalidArgument, match="dtype"):
        codec.expect(msg, name="t", dtypes=[common_pb2.DTYPE_UINT8], ndim=3)


@pytest.mark.parametrize("t,h,w", [(7, 32, 32), (3, 256, 256), (2, 720, 1280), (1, 1080, 1920), (5, 17, 23)])
def test_frame_chunks_stay_under_limit_and_reassemble(t, h, w):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    chunks = list(codec.frame_chunks(frames))
    assert all(c.ByteSize() < 1024 * 1024 for c in chunks)
    np.testing.assert_array_equal(codec.assemble(chunks), frames)


def test_assembler_yields_frames_as_soon_as_complete():
    frames = np.random.default_rng(2).integers(0, 256, (2, 720, 1280, 3), dtype=np.uint8)
    asm = codec.FrameAssembler()
    done = []
    for c in codec.frame_chunks(frames):
        got = asm.add(c)
        done.extend(got)
        if len(done) == 1 and got:
            np.testing.assert_array_equal(done[0], frames[0])
    assert len(done) == 2


def test_assembler_rejects_out_of_order_and_size_change():
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    chunks = list(codec.frame_chunks(frames, max_bytes=8 * 8 * 3))
    asm = codec.FrameAssembler()
    asm.add(chunks[0])
    with pytest.raises(InvalidArgument, match="expected frame 1"):
        asm.add(chunks[2])
    asm2 = codec.FrameAssembler()
    asm2.add(chunks[0])
    other = next(codec.frame_chunks(np.zeros((1, 4, 8, 3), np.uint8), start=1))
    with pytest.raises(InvalidArgument, match="size changed"):
        asm2.add(other)


def test_stream_ending_inside_a_frame_is_an_error():
    frames = np.zeros((1, 720, 1280, 3), np.uint8)
    chunks = list(codec.frame_chunks(frames))
    with pytest.raises(InvalidArgument, match="inside a frame"):
        codec.assemble(chunks[:-1])
