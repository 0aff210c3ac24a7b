"""Tensor <-> proto conversion and frame chunking: the one codec every service uses.

Tensors travel as {dtype, shape, raw little-endian row-major bytes} (KServe v2 style).
bfloat16 has no numpy dtype, so it travels as its 16-bit pattern and is rebuilt with torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from videomesh.errors import InvalidArgument
from videomesh.v1 import common_pb2 as pb

# The largest message any hop sends or accepts. Chunks stay below MAX_CHUNK_BYTES so the
# proto framing around them never pushes a message over the limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_CHUNK_BYTES = 1024 * 1024 - 4096
# The text hops (Encode replies, DenoiseRequest) of a model with long, wide text states: Wan's
# UMT5 states are 512 x 4096 bf16 = 4 MiB per text, and both messages carry the prompt and its
# negative (8 MiB). They travel whole under this raised limit on the encoder and denoiser servers
# and on the gateway's channels to them, not in chunks: one request's text is needed whole before
# anything can start, so chunks would only add framing. Everything else stays at MAX_MESSAGE_BYTES.
TEXT_MESSAGE_BYTES = 32 * 1024 * 1024
# Sanity bounds on what a message may *declare*, checked before anything is allocated: a
# tensor's shape (even with a zero dimension) never describes more than a message can carry,
# and a frame (which may arrive as bands of rows) is at most MAX_FRAME_SIDE on each side. No
# hop of the mesh makes frames near that (the upscaler stops at 2048).
MAX_NDIM = 8
MAX_FRAME_SIDE = 4096

_NP_OF = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_BOOL: np.dtype("?"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),  # bit pattern; see module docstring
}
# numpy dtype (native byte order) -> wire dtype. bf16 is not here: only torch tensors carry it.
_DTYPE_OF = {np.dtype(v.str.lstrip("<|")): k for k, v in _NP_OF.items() if k != pb.DTYPE_BFLOAT16}


def _torch():
    import torch

    return torch


def to_proto(array, *, name: str = "tensor") -> pb.Tensor:
    """Encode a numpy array or torch tensor (any dtype the model uses, bf16 included)."""
    if not isinstance(array, np.ndarray):
        torch = _torch()
        if isinstance(array, torch.Tensor):
            t = array.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                bits = t.view(torch.int16).numpy().view("<u2")
                return pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=list(t.shape), data=bits.tobytes())
            array = t.numpy()
        else:
            array = np.asarray(array)
    key = np.dtype(array.dtype).newbyteorder("=")
    if key not in _DTYPE_OF:
        raise InvalidArgument(f"{name}: unsupported dtype {array.dtype}", field=name)
    code = _DTYPE_OF[key]
    data = np.ascontiguousarray(array, dtype=_NP_OF[code]).tobytes()
    return pb.Tensor(dtype=code, shape=list(array.shape), data=data)


def dtype_name(code: int) -> str:
    """The DType's name, or the bare number for a value this build does not know (never raises)."""
    try:
        return pb.DType.Name(code)
    except ValueError:
        return f"DType({code})"


def _check(msg: pb.Tensor, name: str) -> np.dtype:
    if msg.dtype not in _NP_OF:
        raise InvalidArgument(f"{name}: dtype is unspecified or unknown ({msg.dtype})", field=f"{name}.dtype")
    shape = list(msg.shape)
    if len(shape) > MAX_NDIM:
        raise InvalidArgument(
            f"{name}: at most {MAX_NDIM} dimensions; got {len(shape)}", field=f"{name}.shape"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: negative dimension in shape {shape}", field=f"{name}.shape")
    dt = _NP_OF[msg.dtype]
    # Python ints: a product of int64s wraps ([1, 2**32, 2**32] is 0 in int64). The bound ignores
    # zero dimensions so an empty tensor cannot declare an absurd shape either.
    if math.prod(max(d, 1) for d in shape) * dt.itemsize > MAX_MESSAGE_BYTES:
        raise InvalidArgument(
            f"{name}: shape {shape} describes more than the {MAX_MESSAGE_BYTES} bytes a message may carry",
            field=f"{name}.shape",
        )
    expected = math.prod(shape) * dt.itemsize
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"{name}: shape {shape} of {dtype_name(msg.dtype)} needs {expected} bytes, got {len(msg.data)}",
            field=f"{name}.data",
        )
    return dt


def to_numpy(msg: pb.Tensor, *, name: str = "tensor") -> np.ndarray:
    """Decode to numpy. bf16 is widened to float32 (numpy has no bf16)."""
    dt = _check(msg, name)
    arr = np.frombuffer(msg.data, dtype=dt).reshape(tuple(msg.shape))
    if msg.dtype == pb.DTYPE_BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def to_torch(msg: pb.Tensor, *, name: str = "tensor"):
    """Decode to a torch tensor, keeping bf16 as bf16."""
    torch = _torch()
    dt = _check(msg, name)
    arr = np.frombuffer(msg.data, dtype=dt).reshape(tuple(msg.shape)).copy()
    if msg.dtype == pb.DTYPE_BFLOAT16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def split_rows(msg: pb.Tensor, *, name: str = "tensor") -> list[pb.Tensor]:
    """Split a tensor along dim 0 into one (1, ...) tensor per row, by slicing its bytes: nothing is
    decoded or converted, so bf16 stays bf16 (to_numpy widens it to float32) and a row costs one copy.

    Checks only what the slicing needs (a known dtype, at least one dimension, bytes matching the
    shape): the data is already in memory, so no bound on the declared size applies here."""
    if msg.dtype not in _NP_OF:
        raise InvalidArgument(f"{name}: dtype is unspecified or unknown ({msg.dtype})", field=f"{name}.dtype")
    shape = list(msg.shape)
    if not shape or len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: cannot split shape {shape} by rows", field=f"{name}.shape")
    row = math.prod(shape[1:]) * _NP_OF[msg.dtype].itemsize
    if len(msg.data) != row * shape[0]:
        raise InvalidArgument(
            f"{name}: shape {shape} of {dtype_name(msg.dtype)} needs {row * shape[0]} bytes, got {len(msg.data)}",
            field=f"{name}.data",
        )
    return [
        pb.Tensor(dtype=msg.dtype, shape=[1, *shape[1:]], data=msg.data[i * row : (i + 1) * row])
        for i in range(shape[0])
    ]


def expect(msg: pb.Tensor, *, name: str, dtypes: Iterable[int], ndim: int) -> None:
    """Raise InvalidArgument unless msg has one of dtypes and ndim dimensions."""
    allowed = list(dtypes)
    if msg.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise InvalidArgument(
            f"{name}: dtype must be one of {names}; got {dtype_name(msg.dtype)}", field=f"{name}.dtype"
        )
    if len(msg.shape) != ndim:
        raise InvalidArgument(
            f"{name}: expected {ndim} dimensions, got shape {list(msg.shape)}", field=f"{name}.shape"
        )
    _check(msg, name)


# --- frames -------------------------------------------------------------------------------


def frame_chunks(
    frames: np.ndarray, *, start: int = 0, max_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[pb.FrameChunk]:
    """Split (T, H, W, 3) uint8 frames into chunks of at most max_bytes of pixels.

    Several whole frames share a chunk when they fit; a frame larger than max_bytes
    (720p is 2.7 MB) is sent as bands of rows.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    frame_bytes = h * w * 3
    if frame_bytes <= max_bytes:
        per = max(1, max_bytes // frame_bytes)
        for i in range(0, t, per):
            yield pb.FrameChunk(
                frame_index=start + i, row_offset=0, frame_height=h, pixels=to_proto(frames[i : i + per])
            )
    else:
        rows = max(1, max_bytes // (w * 3))
        for i in range(t):
            for r in range(0, h, rows):
                band = frames[i : i + 1, r : r + rows]
                yield pb.FrameChunk(
                    frame_index=start + i, row_offset=r, frame_height=h, pixels=to_proto(band)
                )


class FrameAssembler:
    """Reassembles chunks into whole frames, in order, as soon as each frame is complete.

    Rejects out-of-order, overlapping or malformed chunks with InvalidArgument, so a
    receiver never silently produces a scrambled video. Nothing is allocated from a declared
    size: a frame sent as bands is kept as the bands received and joined once complete, so
    memory follows the bytes actually sent (a chunk claiming frame_height 2**31-1 costs
    nothing), and declared sizes are bounded by `max_side`.
    """

    def __init__(
        self,
        *,
        width: int | None = None,
        height: int | None = None,
        field: str = "frames",
        max_side: int = MAX_FRAME_SIDE,
    ):
        self.width = width
        self.height = height
        self.field = field
        self.max_side = max_side
        self.next_frame = 0
        self._bands: list[np.ndarray] = []
        self._band_rows = 0

    def add(self, chunk: pb.FrameChunk) -> list[np.ndarray]:
        """Feed one chunk; return the frames it completed (each (H, W, 3) uint8)."""
        px = to_numpy(chunk.pixels, name=f"{self.field}.pixels")
        if px.dtype != np.uint8 or px.ndim != 4 or px.shape[-1] != 3:
            raise InvalidArgument(
                f"{self.field}: pixels must be (n, rows, width, 3) uint8; got {list(px.shape)} {px.dtype}",
                field=f"{self.field}.pixels",
            )
        n, rows, w, _ = px.shape
        if n == 0 or rows == 0 or w == 0:
            raise InvalidArgument(
                f"{self.field}: pixels need at least one frame, row and column; got shape {list(px.shape)}",
                field=f"{self.field}.pixels.shape",
            )
        h = chunk.frame_height or rows
        if not rows <= h <= self.max_side or w > self.max_side:
            raise InvalidArgument(
                f"{self.field}: frame {w}x{h} (frame_height {chunk.frame_height}, {rows} rows sent) must be at "
                f"most {self.max_side} pixels per side and at least as tall as the rows sent",
                field=f"{self.field}.frame_height",
            )
        if self.width is None:
            self.width, self.height = w, h
        if w != self.width or h != self.height:
            raise InvalidArgument(
                f"{self.field}: frame size changed mid-stream: {w}x{h}, expected {self.width}x{self.height}",
                field=f"{self.field}.pixels",
            )
        if chunk.frame_index != self.next_frame:
            raise InvalidArgument(
                f"{self.field}: chunk for frame {chunk.frame_index} arrived, expected frame {self.next_frame}",
                field=f"{self.field}.frame_index",
            )
        if rows == h and chunk.row_offset == 0 and not self._bands:
            self.next_frame += n
            return list(px)
        # a band of rows of a single frame
        if n != 1 or chunk.row_offset != self._band_rows or chunk.row_offset + rows > h:
            raise InvalidArgument(
                f"{self.field}: bad row band (frame {chunk.frame_index}, rows {chunk.row_offset}+{rows} of {h})",
                field=f"{self.field}.row_offset",
            )
        self._bands.append(px[0])
        self._band_rows += rows
        if self._band_rows < h:
            return []
        frame = np.concatenate(self._bands, axis=0)
        self._bands, self._band_rows = [], 0
        self.next_frame += 1
        return [frame]

    @property
    def partial(self) -> bool:
        return bool(self._bands)


def assemble(chunks: Iterable[pb.FrameChunk]) -> np.ndarray:
    """Collect a whole chunk stream into one (T, H, W, 3) array (tests and small clips)."""
    asm = FrameAssembler()
    frames: list[np.ndarray] = []
    for c in chunks:
        frames.extend(asm.add(c))
    if asm.partial:
        raise InvalidArgument("frames: stream ended inside a frame", field="frames")
    if not frames:
        return np.zeros((0, asm.height or 0, asm.width or 0, 3), np.uint8)
    return np.stack(frames)
