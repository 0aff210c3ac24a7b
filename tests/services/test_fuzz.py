"""Property-based fuzzing of every RPC of every service against a real in-process mesh (issue 18, item 17).

The RPCs are enumerated from the generated descriptors (every `videomesh.v1.*_pb2` module), and
each request strategy is derived from the request's message descriptor, so a new RPC, a new field
or a new service is fuzzed without touching this file; a field type the builder does not know
fails the test ("no strategy"), and so does a served RPC missing from the list or one no server serves.

For each RPC hypothesis sends (a) generated messages: random field values with NaN/inf floats,
extreme integers, unknown enum values, odd tensor shapes and dtypes, random bytes, sometimes
without an API key; and (b) random raw bytes that need not parse. The property: the status is
never INTERNAL or UNKNOWN (a bad request is the client's fault and says so), and every server
is still SERVING afterwards.

Bounded: MAX_EXAMPLES examples per RPC and kind, CALL_TIMEOUT seconds per call, a tenant whose
tier admits only a few jobs (accepted specs run the tiny model), denoiser requests of at most
a few steps. CI (CI=true) runs a fixed sequence of examples; elsewhere each run explores anew.
"""

from __future__ import annotations

import importlib
import math
import os
import pkgutil
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import videomesh.v1
from tests.helpers import InProcessMesh
from videomesh import codec
from videomesh.v1 import common_pb2

MAX_EXAMPLES = int(os.environ.get("VIDEOMESH_FUZZ_EXAMPLES", "40"))  # more for a deeper local run
CALL_TIMEOUT = 5.0
MAX_REPLIES = 2000  # a server stream is read to its end, but not forever
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# VIDEOMESH_FUZZ_REPORT=FILE: every status seen, per RPC and kind of input, written there as JSON at the end
# (the reliability suite's fuzz table: scripts/reliability.py)
REPORT: dict[str, dict[str, dict[str, int]]] = {}
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # each call has its own CALL_TIMEOUT
    database=None,  # no .hypothesis folder in the work tree
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=list(HealthCheck),
)


def _all_methods():
    """(path, method descriptor) of every RPC in every generated videomesh.v1 module."""
    out = {}
    for mod in pkgutil.iter_modules(videomesh.v1.__path__):
        if not mod.name.endswith("_pb2"):
            continue
        pb2 = importlib.import_module(f"videomesh.v1.{mod.name}")
        for svc in pb2.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                out[f"/{svc.full_name}/{m.name}"] = m
    return dict(sorted(out.items()))


METHODS = _all_methods()
# The slow ones: the gateway's (each may admit a job that runs the whole tiny pipeline) and the denoiser's.
SLOW_SERVICES = ("videomesh.v1.VideoService", "videomesh.v1.Denoiser")


def _params():
    for path in METHODS:
        marks = [pytest.mark.slow] if path.split("/")[1] in SLOW_SERVICES else []
        yield pytest.param(path, id=path.strip("/"), marks=marks)


# --- strategies from descriptors -----------------------------------------------------------------

INT32_EDGES = [0, 1, -1, 2, 4, 8, 16, 64, 256, 2**31 - 1, -(2**31)]
INT64_EDGES = [*INT32_EDGES, 2**32, 2**53 + 1, 2**63 - 1, -(2**63)]
STRING_EDGES = ["", " ", "a", "9223372036854775808", "-1", "1e9", "../../etc/passwd", "x" * 3000,
                "a red ball moving right on a black background", "\u202e\u0000", "🎥" * 10]  # fmt: skip


def _ints(lo: int, hi: int, edges) -> st.SearchStrategy:
    # edges, small plausible values (to get past the first checks), anything
    return st.one_of(
        st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(0, 16), st.integers(lo, hi)
    )


def _scalar(field: FD, pools: dict) -> st.SearchStrategy:
    t = field.type
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _ints(-(2**31), 2**31 - 1, INT32_EDGES)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _ints(-(2**63), 2**63 - 1, INT64_EDGES)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _ints(0, 2**32 - 1, INT64_EDGES)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _ints(0, 2**64 - 1, INT64_EDGES)
    if t == FD.TYPE_FLOAT:
        edges = [0.0, -0.0, 1.0, -1.0, 8.0, 24.0, math.nan, math.inf, -math.inf, 1e30, -1e30, 3.4e38, 1e-45]
        return st.one_of(st.sampled_from(edges), st.floats(width=32))
    if t == FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e308, -1.0]), st.floats())
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        text = st.one_of(st.sampled_from(STRING_EDGES), st.text(max_size=40))
        hints = pools.get("strings", {}).get(field.name)
        return st.one_of(st.sampled_from(hints), text) if hints else text  # hints get past NOT_FOUND
    if t == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=256), st.sampled_from(pools.get("blobs", [b""])))
    if t == FD.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(
            st.sampled_from(known), st.sampled_from([99, -1, 2**31 - 1]), st.integers(-(2**31), 2**31 - 1)
        )
    raise NotImplementedError(f"no strategy for field {field.full_name} of type {t}")


@st.composite
def _tensor(draw) -> common_pb2.Tensor:
    """Realistic frames and embeddings, and wild ones: unknown dtypes, overflowing, negative or
    zero dimensions, 100 dimensions, data that does or does not match the shape."""
    dtypes = [v.number for v in common_pb2.DType.DESCRIPTOR.values]
    dtype = draw(st.one_of(st.sampled_from(dtypes), st.sampled_from([99, -1, 2**31 - 1])))
    frames = st.tuples(st.integers(1, 3), st.integers(1, 24), st.integers(1, 24), st.just(3))
    shape = draw(
        st.one_of(
            frames.map(list),
            st.tuples(st.just(1), st.integers(0, 6), st.sampled_from([32, 16, 7])).map(list),  # embeddings
            st.tuples(st.just(1), st.integers(0, 6)).map(list),  # masks
            st.lists(st.sampled_from([0, 1, 2, 3, 8, 2**31 - 1, 2**32, 2**62, -1]), max_size=6),
            st.sampled_from([[1] * 100, [1, 2**32, 2**32], [0, 2**62, 2**62], [2**63 - 1]]),
        )
    )
    itemsize = {common_pb2.DTYPE_FLOAT64: 8, common_pb2.DTYPE_INT64: 8, common_pb2.DTYPE_FLOAT32: 4,
                common_pb2.DTYPE_INT32: 4, common_pb2.DTYPE_FLOAT16: 2, common_pb2.DTYPE_BFLOAT16: 2}.get(dtype, 1)  # fmt: skip
    n = math.prod(shape) * itemsize if all(d >= 0 for d in shape) else -1
    if 0 <= n <= 64 * 1024 and draw(st.booleans()):
        if dtype in (common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_FLOAT64) and draw(
            st.booleans()
        ):
            np_dtype = {4: "<f4", 2: "<f2", 8: "<f8"}[itemsize]
            value = draw(st.sampled_from([0.0, 1.0, np.nan, np.inf, -1e4]))
            data = np.full(math.prod(shape), value, np_dtype).tobytes()
        else:
            data = bytes(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, n, np.uint8))
    else:
        data = draw(st.binary(max_size=64))
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def message_strategy(desc, pools: dict, depth: int = 0) -> st.SearchStrategy:
    """Instances of the message `desc` with a random subset of its fields set to random values."""
    if desc.full_name == common_pb2.Tensor.DESCRIPTOR.full_name:
        return _tensor()
    cls = GetMessageClass(desc)
    if depth > 4:
        return st.just(cls())
    field_strategies = {}
    for f in desc.fields:
        if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            k = _scalar(f.message_type.fields_by_name["key"], pools)
            vf = f.message_type.fields_by_name["value"]
            v = (
                message_strategy(vf.message_type, pools, depth + 1)
                if vf.type == FD.TYPE_MESSAGE
                else _scalar(vf, pools)
            )
            field_strategies[f.name] = st.dictionaries(k, v, max_size=3)
            continue
        one = (
            message_strategy(f.message_type, pools, depth + 1)
            if f.type == FD.TYPE_MESSAGE
            else _scalar(f, pools)
        )
        field_strategies[f.name] = st.lists(one, max_size=4) if _repeated(f) else one

    @st.composite
    def build(draw):
        msg = cls()
        for name, strat in field_strategies.items():
            # 30% of the fields set (their defaults are often what passes), 80% of those with hints
            hinted = name in pools.get("strings", {})
            if draw(st.integers(0, 9)) >= (8 if hinted else 3):
                continue
            value = draw(strat)
            f = desc.fields_by_name[name]
            if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
                target = getattr(msg, name)
                for k, v in value.items():
                    if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif _repeated(f):
                getattr(msg, name).extend(value)
            elif f.type == FD.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return build()


def _repeated(f: FD) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED  # protobuf < 6


def request_strategy(method, pools: dict) -> st.SearchStrategy:
    """-> a list of serialized request messages (one for a unary request)."""
    one = message_strategy(method.input_type, pools).map(lambda m: m.SerializeToString())
    return st.lists(one, min_size=1, max_size=5) if method.client_streaming else one.map(lambda b: [b])


def raw_strategy(method) -> st.SearchStrategy:
    one = st.binary(max_size=64)
    return st.lists(one, min_size=1, max_size=3) if method.client_streaming else one.map(lambda b: [b])


# --- the mesh --------------------------------------------------------------------------------------


def _clip(path: Path, size: str, frames: int) -> bytes:
    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc=s={size}:r=8", "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast",
         "-pix_fmt", "yuv420p", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path.read_bytes()


@pytest.fixture(scope="module")
def fuzz_mesh(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    mesh = InProcessMesh(
        d,
        gateway={
            "workers": 1,
            "qc_policy": "off",
            # accepted specs run the tiny pipeline: admit only a few of them
            "tiers": {"free": {"daily_quota": 3, "burst": 3, "max_active": 2}},
        },
    )
    try:
        key = mesh.tenants.add("fuzzer", "free")
        video = mesh.gateway.create(mesh.tenants.authenticate(key), common_pb2.VideoSpec(prompt="a red ball"))
        blobs = [
            _clip(d / "small.mp4", "64x64", 4),
            _clip(d / "huge.mp4", "4096x4096", 1),
            b"\x00\x00\x00\x18ftypmp42",
        ]
        servers = {}  # service full name -> address, from each server's reflection
        for srv in mesh.servers.values():
            with grpc.insecure_channel(srv.address) as ch:
                stub = reflection_pb2_grpc.ServerReflectionStub(ch)
                resp = next(
                    stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                    )
                )
                for s in resp.list_services_response.service:
                    servers.setdefault(s.name, srv.address)
        channels = {addr: grpc.insecure_channel(addr) for addr in set(servers.values())}
        yield {
            "mesh": mesh,
            "key": key,
            "servers": servers,
            "channels": channels,
            "pools": {
                "blobs": blobs,
                "strings": {  # values that reach past the first checks of the fields so named
                    "id": [video.id, video.id + "x"],
                    "template_id": sorted(mesh.gateway.templates.templates),
                    "prompt": ["a red ball moving right on a black background", "a blue box"],
                },
            },
        }
        for ch in channels.values():
            ch.close()
    finally:
        mesh.stop()
        if os.environ.get("VIDEOMESH_FUZZ_REPORT"):
            import json

            Path(os.environ["VIDEOMESH_FUZZ_REPORT"]).write_text(json.dumps(REPORT, indent=1, sort_keys=True))


def _report(path: str, kind: str, seen: dict) -> None:
    into = REPORT.setdefault(path, {}).setdefault(kind, {})
    for code, n in seen.items():
        into[code] = into.get(code, 0) + n


def _call(
    channel: grpc.Channel, path: str, method, msgs: list[bytes], metadata
) -> tuple[grpc.StatusCode, str]:
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    rpc = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
    request = iter(msgs) if method.client_streaming else msgs[0]
    try:
        if method.server_streaming:
            call = rpc(request, timeout=CALL_TIMEOUT, metadata=metadata)
            for i, _ in enumerate(call):
                if i >= MAX_REPLIES:
                    call.cancel()
                    break
        else:
            rpc(request, timeout=CALL_TIMEOUT, metadata=metadata)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _all_serving(fm) -> None:
    for srv in fm["mesh"].servers.values():
        with grpc.insecure_channel(srv.address) as ch:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                .status
            )
        assert status == health_pb2.HealthCheckResponse.SERVING, f"{srv.address} is no longer SERVING"


def _tally(seen: dict, path: str, code: grpc.StatusCode, details: str) -> None:
    """Count the statuses (printed at the end: pytest shows them with -s or on failure) and check one."""
    seen[code.name] = seen.get(code.name, 0) + 1
    assert code not in BAD_CODES, f"{path} answered {code.name}: {details}"


def _metadata(fm, choice: int):
    return [(("authorization", f"Bearer {fm['key']}"),), (), (("authorization", "Bearer nope"),)][choice]


# --- the tests -------------------------------------------------------------------------------------


def test_every_served_rpc_is_fuzzed_and_every_fuzzed_rpc_is_served(fuzz_mesh):
    served = {
        f"/{name}/{m.name}"
        for name in fuzz_mesh["servers"]
        if name.startswith("videomesh.")
        for m in descriptor_pool.Default().FindServiceByName(name).methods
    }
    assert served, "reflection listed no videomesh service"
    assert served <= set(METHODS), f"served but not fuzzed: {sorted(served - set(METHODS))}"
    assert set(METHODS) <= served, f"no server of the mesh serves {sorted(set(METHODS) - served)}"
    for method in METHODS.values():  # built eagerly: a field type without a strategy fails here
        request_strategy(method, fuzz_mesh["pools"])


@pytest.mark.parametrize("path", list(_params()))
def test_generated_requests_never_internal(fuzz_mesh, path):
    method = METHODS[path]
    channel = fuzz_mesh["channels"][fuzz_mesh["servers"][method.containing_service.full_name]]
    seen: dict[str, int] = {}

    @FUZZ
    @given(msgs=request_strategy(method, fuzz_mesh["pools"]), auth=st.sampled_from([0, 0, 0, 0, 1, 2]))
    def run(msgs, auth):
        t0 = time.monotonic()
        _tally(seen, path, *_call(channel, path, method, msgs, _metadata(fuzz_mesh, auth)))
        assert time.monotonic() - t0 < CALL_TIMEOUT + 2, f"{path} ignored its deadline"

    run()
    print(path, seen)
    _report(path, "generated", seen)
    _all_serving(fuzz_mesh)


@pytest.mark.parametrize("path", list(_params()))
def test_raw_bytes_never_internal(fuzz_mesh, path):
    method = METHODS[path]
    channel = fuzz_mesh["channels"][fuzz_mesh["servers"][method.containing_service.full_name]]
    seen: dict[str, int] = {}

    @FUZZ
    @given(msgs=raw_strategy(method))
    def run(msgs):
        _tally(seen, path, *_call(channel, path, method, msgs, _metadata(fuzz_mesh, 0)))

    run()
    print(path, seen)
    _report(path, "raw bytes", seen)
    _all_serving(fuzz_mesh)


@pytest.mark.parametrize("path", list(_params()))
def test_oversize_and_early_ending_requests_get_documented_codes(fuzz_mesh, path):
    """A message one byte over the server's limit is RESOURCE_EXHAUSTED before anything parses it; a
    client stream that ends with no message at all, or a call the client cancels at once, leaves the
    server SERVING (the client sees its own CANCELLED, never INTERNAL)."""
    method = METHODS[path]
    channel = fuzz_mesh["channels"][fuzz_mesh["servers"][method.containing_service.full_name]]
    seen: dict[str, int] = {}
    code, details = _call(
        channel, path, method, [b"\x0a" * (codec.MAX_MESSAGE_BYTES + 1)], _metadata(fuzz_mesh, 0)
    )
    _tally(seen, path, code, details)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    if method.client_streaming:  # a stream that ends before its first message
        _tally(seen, path, *_call(channel, path, method, [], _metadata(fuzz_mesh, 0)))
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    rpc = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
    request = iter([b""]) if method.client_streaming else b""
    future = rpc(request, timeout=CALL_TIMEOUT, metadata=_metadata(fuzz_mesh, 0)) if method.server_streaming else \
        rpc.future(request, timeout=CALL_TIMEOUT, metadata=_metadata(fuzz_mesh, 0))  # fmt: skip
    future.cancel()  # the client goes away at once
    seen["CANCELLED (by the client)"] = 1
    _report(path, "oversize, empty, cancelled", seen)
    _all_serving(fuzz_mesh)


# --- deeper: requests that get past the first checks, then go wrong ---------------------------------


def _fuzz_one(fm, path: str, strategy: st.SearchStrategy) -> dict:
    method = METHODS[path]
    channel = fm["channels"][fm["servers"][method.containing_service.full_name]]
    seen: dict[str, int] = {}

    @FUZZ
    @given(msgs=strategy)
    def run(msgs):
        _tally(seen, path, *_call(channel, path, method, [m.SerializeToString() for m in msgs], ()))

    run()
    print(path, seen)
    _report(path, "near-valid", seen)
    _all_serving(fm)
    return seen


def _mutated(draw, valid: dict, bad: dict) -> dict:
    """`valid` with 0, 1 or 2 of its fields replaced by a value drawn from `bad[field]`: a third of
    the examples get all the way through, the rest fail one or two checks deep in."""
    out = dict(valid)
    for name in draw(st.lists(st.sampled_from(sorted(bad)), max_size=2, unique=True)):
        out[name] = draw(bad[name])
    return out


@pytest.mark.slow
def test_denoise_near_valid_requests_never_internal(fuzz_mesh):
    """Generic requests rarely get past the tensor checks: these are valid requests (the tiny
    model, one or two steps) with one or two fields made extreme."""
    from videomesh.v1 import denoiser_pb2

    def tensor(shape, dtype=common_pb2.DTYPE_FLOAT32, fill=0.5):
        n = math.prod(shape)
        data = bytes([1]) * n if dtype == common_pb2.DTYPE_BOOL else np.full(n, fill, "<f4").tobytes()
        return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)

    BOOL = common_pb2.DTYPE_BOOL
    embeddings = st.one_of(
        st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e30]).map(lambda v: tensor([1, 5, 32], fill=v)),
        st.sampled_from([[1, 0, 32], [1, 5, 16], [2, 5, 32], [1, 4096, 32]]).map(tensor),
        st.sampled_from([99, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_FLOAT16]).map(
            lambda d: common_pb2.Tensor(dtype=d, shape=[1, 5, 32], data=bytes(320 if d != 99 else 640))
        ),
    )
    masks = st.one_of(
        st.sampled_from([[1, 0], [1, 4], [1, 6], [2, 5]]).map(lambda s: tensor(s, BOOL)),
        st.just(common_pb2.Tensor(dtype=BOOL, shape=[1, 5], data=bytes(5))),  # no real token
    )
    bad = {
        "text_embeddings": embeddings,
        "negative_embeddings": embeddings,
        "text_mask": masks,
        "negative_mask": masks,
        "num_frames": st.sampled_from([5, -1, 2**31 - 1]),
        "height": st.sampled_from([17, -16, 2**31 - 1]),
        "width": st.sampled_from([8, 2**31 - 1]),
        "seed": st.sampled_from([-1, 2**63 - 1, -(2**63)]),
        "num_steps": st.sampled_from([-1, 101, 2**31 - 1]),
        "guidance_scale": st.sampled_from([math.nan, math.inf, -1.0, 1e30, 30.0]),
        "adapter": st.sampled_from(["nope", "../x", "a/b/c", "x" * 300, "\x00"]),
        "adapter_strength": st.sampled_from([math.nan, -1.0, 3.0]),
        "encoder_model": st.sampled_from(["tiny@junk", "x" * 1000]),
    }

    @st.composite
    def near_valid(draw):
        valid = dict(text_embeddings=tensor([1, 5, 32]), text_mask=tensor([1, 5], BOOL),
                     negative_embeddings=tensor([1, 5, 32], fill=0.0), negative_mask=tensor([1, 5], BOOL),
                     seed=draw(st.integers(0, 99)), num_steps=draw(st.sampled_from([1, 2])))  # fmt: skip
        return [denoiser_pb2.DenoiseRequest(**_mutated(draw, valid, bad))]

    seen = _fuzz_one(fuzz_mesh, "/videomesh.v1.Denoiser/Denoise", near_valid())
    assert seen.get("OK") and len(seen) > 1, f"the requests did not reach both outcomes: {seen}"


@st.composite
def _clip_chunks(draw) -> tuple[int, int, int, list]:
    """A small clip as the mesh sends it (whole frames or bands of rows), sometimes with one
    chunk tampered with: -> (frames, height, width, chunks)."""
    t, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    frames = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (t, h, w, 3), np.uint8)
    chunks = list(
        codec.frame_chunks(frames, max_bytes=draw(st.sampled_from([w * 3, 2 * w * 3, h * w * 3, 1 << 20])))
    )
    i = draw(st.integers(0, len(chunks) - 1))
    what = draw(
        st.sampled_from(["none", "none", "none", "frame_height", "row_offset", "frame_index", "drop", "dup"])
    )
    if what == "drop":
        del chunks[i]
    elif what == "dup":
        chunks.insert(i, chunks[i])
    elif what != "none":
        setattr(chunks[i], what, draw(st.sampled_from([-1, 0, 1, h + 1, 2**31 - 1])))
    return t, h, w, chunks


@pytest.mark.slow
def test_inspect_near_valid_streams_never_internal(fuzz_mesh):
    from videomesh.v1 import qc_pb2

    bad = {
        "fps": st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e30, 0.01, 240.0]),
        "total_frames": st.sampled_from([-1, 2**31 - 1, 1]),
        "expect_motion": st.booleans(),
    }

    @st.composite
    def stream(draw):
        t, _, _, chunks = draw(_clip_chunks())
        s = qc_pb2.InspectSettings(**_mutated(draw, {"fps": 8.0, "total_frames": t}, bad))
        return [qc_pb2.InspectRequest(settings=s)] + [qc_pb2.InspectRequest(frames=c) for c in chunks]

    seen = _fuzz_one(fuzz_mesh, "/videomesh.v1.QualityCheck/Inspect", stream())
    assert seen.get("OK") and len(seen) > 1, f"the streams did not reach both outcomes: {seen}"


@pytest.mark.slow
def test_upscale_near_valid_streams_never_internal(fuzz_mesh):
    from videomesh.v1 import upscaler_pb2

    sides = st.sampled_from([1, 4, 8, 11, 12, 0, -8, 2049])
    bad = {
        "input_frames": st.sampled_from([0, -1, 2**31 - 1, 5]),
        "input_fps": st.sampled_from([0.0, math.nan, -math.inf, 1e30]),
        "output_width": sides,
        "output_height": sides,
        "output_frames": st.sampled_from([0, 1, 2, 9, 12, 1441, -1]),
        "output_fps": st.sampled_from([0.0, math.nan, math.inf]),
    }

    @st.composite
    def stream(draw):
        t, h, w, chunks = draw(_clip_chunks())
        valid = dict(
            input_frames=t,
            input_fps=4.0,
            output_width=32,
            output_height=24,
            output_frames=2 * t,
            output_fps=8.0,
        )
        s = upscaler_pb2.UpscaleSettings(**_mutated(draw, valid, bad))
        return [upscaler_pb2.UpscaleRequest(settings=s)] + [
            upscaler_pb2.UpscaleRequest(frames=c) for c in chunks
        ]

    seen = _fuzz_one(fuzz_mesh, "/videomesh.v1.Upscaler/Upscale", stream())
    assert seen.get("OK") and len(seen) > 1, f"the streams did not reach both outcomes: {seen}"


def test_zz_a_normal_generation_still_works_after_the_fuzzing(fuzz_mesh):
    """Last in the module (pytest runs a module's tests in order): after every fuzzed RPC, the mesh still
    makes a video end to end."""
    from videomesh.client import VideoClient

    mesh = fuzz_mesh["mesh"]
    key = mesh.tenants.add("after-fuzz", "pro")
    with VideoClient(mesh.address, api_key=key) as c:
        events = list(c.generate(common_pb2.VideoSpec(prompt="a red ball moves right", seed=77), timeout=120))
    assert events[-1].WhichOneof("event") == "completed", events[-1]
    REPORT.setdefault("(after) a normal generation", {})["end to end"] = {"OK": 1}
    _all_serving(fuzz_mesh)
