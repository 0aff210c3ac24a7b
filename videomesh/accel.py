"""Other runtimes for the small networks: ONNX export, onnxruntime on the CPU, TensorRT on CUDA, torch.compile.

`accelerate(module, runtime, example_inputs, cache_dir)` gives a drop-in callable for `module`:

- "torch": the module itself;
- "onnx": the module exported to ONNX (cached in cache_dir, keyed by its weights, its source
  and the example shapes) and run by onnxruntime's CPU provider (`OnnxModule`), torch tensors in
  and out (on the device they came from);
- "tensorrt": the same ONNX file built into a TensorRT 10 engine on first use (`TensorRTModule`),
  the serialized engine cached beside the ONNX file keyed by a hash of the ONNX bytes, the GPU's
  name, TensorRT's version, the precision flag and the shape profile; run with execute_async_v3
  on torch's current CUDA stream, reading and writing torch CUDA tensors in place;
- "compile": torch.compile(module).

The export uses the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): with torch
2.13 the dynamo exporter (the default) failed on both networks here (the U-Net's "is the motion
head trained" test is data-dependent under torch.export; the SR net's scale read from traced
sizes), while the TorchScript exporter traces both, with dynamic batch / text length / frame
size, and onnxruntime matches torch within 1e-4 (tests/unit/test_onnx.py; ~1e-5 seen).

Traced graphs hold the weights as constants: a module whose weights change after export (a LoRA
merged in place) must not use the exported graph; `WeightGuard` tells (services/denoiser/accel.py
falls back to torch then).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("videomesh.accel")

RUNTIMES = ("torch", "onnx", "tensorrt", "compile")
ONNX_OPSET = 17  # TensorRT 10 and onnxruntime both take it; GroupNorm exports as InstanceNorm + affine
ShapeRanges = dict[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]  # name -> (min, opt, max)


def default_cache_dir() -> Path:
    """$VIDEOMESH_ACCEL_CACHE, else ~/.cache/videomesh/accel."""
    env = os.environ.get("VIDEOMESH_ACCEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "videomesh" / "accel"


def check_runtime(runtime: str, setting: str = "runtime") -> None:
    """ValueError naming the setting for an unknown runtime, or one this machine cannot run."""
    if runtime not in RUNTIMES:
        raise ValueError(f"{setting} must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    why = unavailable(runtime)
    if why:
        raise ValueError(f"{setting}={runtime} {why}")


def unavailable(runtime: str) -> str:
    """Why `runtime` cannot run here ("" when it can)."""
    if runtime == "onnx":
        missing = [m for m in ("onnx", "onnxruntime") if not _importable(m)]
        return (
            f"needs the {' and '.join(missing)} package(s) (pip install onnx onnxruntime)" if missing else ""
        )
    if runtime == "tensorrt":
        if not torch.cuda.is_available() or not _importable("tensorrt") or not _importable("onnx"):
            return "needs CUDA and the tensorrt package (pip install tensorrt onnx)"
        return ""
    if runtime == "compile":
        try:
            import importlib

            ok = importlib.import_module("torch._dynamo").is_dynamo_supported()
        except Exception:  # noqa: BLE001 - any failure means: not here
            ok = False
        return "" if ok else "needs torch.compile, which this torch / Python does not support"
    return ""


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# --- export -------------------------------------------------------------------------------------


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    *,
    opset: int = ONNX_OPSET,
) -> Path:
    """Trace `module` on the CPU (a copy when it lives elsewhere) with `example_inputs` and write
    ONNX to `path` (atomically: a concurrent reader never sees half a file). Dimensions named in
    `dynamic_axes` stay symbolic; every other one is fixed at the example's size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = list(module.parameters()) + list(module.buffers())
    if any(p.device.type != "cpu" for p in params):
        module = copy.deepcopy(module).cpu()  # CUDA-only kernels (xFormers, SDPA) do not export
    inputs = tuple(x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: shape checks become constants, as intended
            torch.onnx.export(
                module,
                inputs,
                str(tmp),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes or {},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        module.train(was_training)
        tmp.unlink(missing_ok=True)
    return path


def module_fingerprint(module: nn.Module, *extra: Any) -> str:
    """A hash of the module's class and source file, its weights and `extra` (shapes, names...):
    the key of its exported ONNX file."""
    h = hashlib.sha256()
    cls = type(module)
    h.update(f"{cls.__module__}.{cls.__qualname__} torch {torch.__version__}".encode())
    try:
        h.update(Path(inspect.getsourcefile(cls)).read_bytes())
    except (TypeError, OSError):
        pass
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(extra, default=str, sort_keys=True).encode())
    return h.hexdigest()[:20]


# --- onnxruntime --------------------------------------------------------------------------------

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
    "tensor(uint8)": "uint8",
}


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime (CPU provider): torch tensors in, torch tensors out.

    Inputs are passed positionally in the graph's input order, converted to the dtype the graph
    declares (zero-copy for contiguous CPU tensors of that dtype); outputs come back on the first
    input's device. `threads`: onnxruntime's intra-op threads (0: torch's intra-op thread count,
    which the services set once from their `threads` setting)."""

    def __init__(self, path: str | Path, *, threads: int = 0, providers: Sequence[str] | None = None):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # no busy-waiting between runs: spinning workers took the cores from torch's own work
        # between forwards (the sampler's steps, the next stage)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.path), so, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = [_ORT_TYPES.get(i.type) for i in self.session.get_inputs()]

    def forward(self, *args: torch.Tensor):
        if len(args) != len(self.input_names):
            raise TypeError(f"{self.path.name} takes {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}); got {len(args)}")  # fmt: skip
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
        feeds = {}
        for name, dt, a in zip(self.input_names, self._dtypes, args, strict=True):
            a = torch.as_tensor(a).detach().to("cpu")
            if dt is not None and str(a.dtype).removeprefix("torch.") != dt:
                a = a.to(getattr(torch, dt))
            feeds[name] = a.contiguous().numpy()
        outs = [torch.from_numpy(o).to(device) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f"{self.path.name}, onnxruntime {self.session.get_providers()}"


# --- TensorRT -----------------------------------------------------------------------------------


def _trt_torch_dtype(trt, dt) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    for name, td in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    return table[dt]


class TensorRTModule(nn.Module):
    """An ONNX file built into a TensorRT 10 engine on first use, run on torch's current CUDA stream.

    `shape_ranges` gives each input's (min, opt, max) shape for the optimization profile (needed for
    every input with a dynamic dimension). The serialized engine is cached beside the ONNX file as
    `<stem>.<key>.engine`, key = sha256(ONNX bytes, GPU name, TensorRT version, fp16, shape_ranges):
    a second process, or a restart, deserializes it instead of building (minutes for big nets).
    `fp16` lets TensorRT pick fp16 kernels (inputs and outputs stay as the graph declares them).
    Inputs outside the profile go to `fallback` (the torch module) when given, else ValueError."""

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        shape_ranges: ShapeRanges | None = None,
        fp16: bool = False,
        workspace_bytes: int = 4 << 30,
        fallback: Callable | None = None,
    ):
        super().__init__()
        why = unavailable("tensorrt")
        if why:
            raise RuntimeError(f"runtime=tensorrt {why}")
        import tensorrt as trt

        self.trt = trt
        self.onnx_path = Path(onnx_path)
        self.shape_ranges = {
            k: tuple(tuple(int(d) for d in s) for s in v) for k, v in (shape_ranges or {}).items()
        }
        self.fp16 = fp16
        self.workspace_bytes = workspace_bytes
        self.fallback = fallback
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = None
        self.context = None

    # the engine ------------------------------------------------------------------------------
    def engine_path(self) -> Path:
        h = hashlib.sha256(self.onnx_path.read_bytes())
        gpu = torch.cuda.get_device_name(torch.cuda.current_device())
        h.update(
            json.dumps([gpu, self.trt.__version__, self.fp16, sorted(self.shape_ranges.items())]).encode()
        )
        return self.onnx_path.with_name(f"{self.onnx_path.stem}.{h.hexdigest()[:20]}.engine")

    def build(self) -> bytes:
        """Parse the ONNX file and build a serialized engine (TensorRT 10 API)."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse {self.onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name in self.shape_ranges:
                lo, opt, hi = self.shape_ranges[tensor.name]
                profile.set_shape(tensor.name, lo, opt, hi)
            elif any(d < 0 for d in tensor.shape):
                raise ValueError(f"input {tensor.name!r} of {self.onnx_path.name} has dynamic shape "
                                 f"{tuple(tensor.shape)}: give its (min, opt, max) in shape_ranges")  # fmt: skip
        config.add_optimization_profile(profile)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT could not build an engine from {self.onnx_path} (see its log)")
        log.info("built a TensorRT engine from %s in %.1f s", self.onnx_path.name, time.perf_counter() - t0)
        return bytes(serialized)

    def load(self) -> None:
        if self.context is not None:
            return
        path = self.engine_path()
        data = path.read_bytes() if path.exists() else None
        runtime = self.trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(data) if data else None
        if engine is None:  # none cached, or cached by an incompatible build: build it
            data = self.build()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            engine = runtime.deserialize_cuda_engine(data)
        self.runtime, self.engine = runtime, engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        import onnx

        graph = onnx.load(str(self.onnx_path), load_external_data=False).graph
        order = [i.name for i in graph.input]  # positional arguments follow the ONNX graph's order
        self.input_names = sorted(inputs, key=lambda n: order.index(n) if n in order else len(order))
        self.output_names = [n for n in names if engine.get_tensor_mode(n) != mode]

    # running ---------------------------------------------------------------------------------
    def in_profile(self, args: Sequence[torch.Tensor]) -> bool:
        for name, a in zip(self.input_names, args, strict=True):
            if name in self.shape_ranges:
                lo, _, hi = self.shape_ranges[name]
                shape = tuple(a.shape)
                if len(shape) != len(lo) or any(not lo[i] <= d <= hi[i] for i, d in enumerate(shape)):
                    return False
        return True

    def forward(self, *args: torch.Tensor):
        self.load()
        if self.fallback is not None and not self.in_profile(args):
            return self.fallback(*args)
        engine, ctx = self.engine, self.context
        if len(args) != len(self.input_names):
            raise TypeError(f"{self.onnx_path.name} takes {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}); got {len(args)}")  # fmt: skip
        device = torch.device("cuda", torch.cuda.current_device())
        back = args[0].device if isinstance(args[0], torch.Tensor) else device
        keep = []  # inputs stay referenced until the work is enqueued (later frees are stream-ordered)
        for name, a in zip(self.input_names, args, strict=True):
            a = torch.as_tensor(a).to(device, _trt_torch_dtype(self.trt, engine.get_tensor_dtype(name)))
            a = a.contiguous()
            if not ctx.set_input_shape(name, tuple(a.shape)):
                raise ValueError(f"{self.onnx_path.name}: input {name!r} of shape {tuple(a.shape)} is outside "
                                 f"the engine's profile {self.shape_ranges.get(name)}")  # fmt: skip
            ctx.set_tensor_address(name, a.data_ptr())
            keep.append(a)
        outs = []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(
                shape, dtype=_trt_torch_dtype(self.trt, engine.get_tensor_dtype(name)), device=device
            )
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.onnx_path.name} failed")
        outs = [o.to(back) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


class WeightGuard:
    """Tells whether a module's weights still equal those it had when the guard was made.

    Cheap on the common path: the sum of the tensors' in-place version counters; only when that
    moved (an adapter merged, or restored) are the values compared with a snapshot (one copy of
    the weights, 8 MB per default U-Net expert), so "merged then restored bit for bit" reads as
    unchanged again."""

    def __init__(self, module: nn.Module):
        self.tensors = [t for t in list(module.parameters()) + list(module.buffers())]
        self.snapshot = [t.detach().clone() for t in self.tensors]
        self.versions = self._versions()

    def _versions(self) -> int:
        return sum(t._version for t in self.tensors)

    def unchanged(self) -> bool:
        v = self._versions()
        if v == self.versions:
            return True
        with torch.no_grad():
            same = all(torch.equal(t, s) for t, s in zip(self.tensors, self.snapshot, strict=True))
        if same:
            self.versions = v
        return same


# --- torch.compile ------------------------------------------------------------------------------


def compile_module(module: nn.Module | Callable, *, dynamic: bool | None = True, mode: str | None = None):
    """torch.compile(module): compiled on the first call of each new shape class (tens of seconds on
    a CPU; measured x1.00 for the default model's denoiser on the 2-core CPU: issue #20)."""
    why = unavailable("compile")
    if why:
        raise RuntimeError(f"runtime=compile {why}")
    return torch.compile(module, dynamic=dynamic, mode=mode)


# --- the factory --------------------------------------------------------------------------------


def accelerate(
    module: nn.Module,
    runtime: str,
    example_inputs: Sequence[torch.Tensor],
    cache_dir: str | Path | None = None,
    *,
    name: str | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] = ("output",),
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    shape_ranges: ShapeRanges | None = None,
    fp16: bool = False,
    threads: int = 0,
    setting: str = "runtime",
):
    """A drop-in callable for `module` (called as module(*example_inputs) is) on `runtime`.

    onnx / tensorrt export the module once to `cache_dir` (default `default_cache_dir()`) as
    `<name>-<fingerprint>.onnx` and reuse the file while weights, source and shapes are the same.
    For tensorrt, dynamic dimensions without `shape_ranges` get min 1, opt the example's size,
    max 8 times it; inputs outside the profile run on `module`. ValueError naming `setting` where the runtime is unknown or cannot run here."""
    check_runtime(runtime, setting)
    if runtime == "torch":
        return module
    if runtime == "compile":
        return compile_module(module)
    input_names = list(input_names or [f"input{i}" for i in range(len(example_inputs))])
    name = name or type(module).__name__
    shapes = [tuple(x.shape) for x in example_inputs]
    key = module_fingerprint(module, name, input_names, list(output_names), dynamic_axes, shapes, ONNX_OPSET)
    path = Path(cache_dir or default_cache_dir()) / f"{name}-{key}.onnx"
    if not path.exists():
        t0 = time.perf_counter()
        export_onnx(module, example_inputs, path, input_names, output_names, dynamic_axes)
        log.info("exported %s to %s in %.1f s", name, path, time.perf_counter() - t0)
    if runtime == "onnx":
        return OnnxModule(path, threads=threads)
    ranges = dict(shape_ranges or {})
    for n, x in zip(input_names, example_inputs, strict=True):
        axes = (dynamic_axes or {}).get(n, {})
        if n not in ranges and axes:
            opt = tuple(x.shape)
            lo = tuple(1 if i in axes else d for i, d in enumerate(opt))
            hi = tuple(8 * d if i in axes else d for i, d in enumerate(opt))
            ranges[n] = (lo, opt, hi)
    return TensorRTModule(path, shape_ranges=ranges, fp16=fp16, fallback=module)


# --- measuring ----------------------------------------------------------------------------------


def _time_in_child(
    net: str, runtime: str, cache_dir: str, threads: int, text_len: int, timed: int
) -> list[float]:
    """In a fresh process: build `net` on `runtime`, three warm-up forwards, then `timed` timed ones."""
    from services.denoiser.model import MODELS, MoEDenoiser
    from services.upscaler.model import SR_MODELS, ResidualESPCN
    from videomesh.weights import load_into

    torch.set_num_threads(threads)
    root = Path(__file__).resolve().parent.parent
    if net == "sr":
        module = ResidualESPCN(SR_MODELS["x8"]).eval()
        load_into(module, root / "services/upscaler/weights/x8.safetensors")
        args = (torch.rand(1, 3, 32, 32),)
        kw = dict(name="sr-x8", input_names=["x"], output_names=["y"], dynamic_axes=SR_DYNAMIC_AXES)
    else:
        model = MoEDenoiser(MODELS["default"]).eval()
        load_into(model, root / "services/denoiser/weights/default.safetensors")
        module = model.experts["low_noise"]
        args = denoiser_example_inputs(MODELS["default"], batch=2, text_len=text_len)
        kw = dict(name="unet-default-low_noise", input_names=UNET_INPUTS, output_names=["v"],
                  dynamic_axes=UNET_DYNAMIC_AXES)  # fmt: skip
    f = accelerate(module, runtime, args, cache_dir, threads=threads, **kw)
    times = []
    with torch.inference_mode():
        for _ in range(3):  # warm-up: torch's first forwards were up to 3x slower (allocations, oneDNN)
            f(*args)
        for _ in range(timed):
            t0 = time.perf_counter()
            f(*args)
            times.append(time.perf_counter() - t0)
    return times


def bench_runtimes(
    repeats: int = 3,
    *,
    compile: bool = False,
    cache_dir: str | Path | None = None,
    threads: int = 0,
    text_len: int = 12,
) -> dict:
    """Seconds per forward (min / median over 2 x `repeats` forwards) of the upscaler's SR net (x8, one
    32x32 frame -> 256x256) and one default U-Net expert (batch 2: one request with CFG) on torch
    and onnxruntime (CPU), and torch.compile when `compile` (tens of seconds of compiling per
    round), with each runtime's speed-up over torch (ratio of medians). For `videomesh bench`.

    Each runtime runs in its own fresh process, as a service runs one runtime: two runtimes'
    thread pools in one process on a 2-core machine slowed torch's forwards up to 6x. The rounds
    interleave the runtimes (torch, onnx, torch, onnx, ...), three warm-up and two timed forwards each."""
    import multiprocessing
    import tempfile

    from videomesh.hardware import describe_cpu

    threads = threads or torch.get_num_threads()
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory()
        cache_dir = tmp.name
    runtimes = ["torch", "onnx"] + (["compile"] if compile and not unavailable("compile") else [])
    out: dict[str, Any] = {"machine": {"cpu": describe_cpu(), "threads": threads}}
    ctx = multiprocessing.get_context("spawn")
    try:
        for net, key in (("sr", "sr_x8_32px"), ("unet", "unet_expert_b2")):
            times: dict[str, list[float]] = {rt: [] for rt in runtimes}
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                for _ in range(repeats):
                    for rt in runtimes:
                        args = (net, rt, str(cache_dir), threads, text_len, 2)
                        times[rt] += pool.apply(_time_in_child, args)
            res = {rt: {"min": min(v), "median": statistics.median(v)} for rt, v in times.items()}
            base = res["torch"]["median"]
            res["speedup_over_torch"] = {rt: base / res[rt]["median"] for rt in runtimes if rt != "torch"}
            out[key] = res
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


# the two networks' export signatures (shared by the upscaler, services/denoiser/accel.py and tests)
SR_DYNAMIC_AXES = {"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "hs", 3: "ws"}}
UNET_INPUTS = ["x", "t", "text", "mask"]
UNET_DYNAMIC_AXES = {
    "x": {0: "b"},
    "t": {0: "b"},
    "text": {0: "b", 1: "l"},
    "mask": {0: "b", 1: "l"},
    "v": {0: "b"},
}


def denoiser_example_inputs(
    cfg, batch: int = 2, text_len: int = 12, generator: torch.Generator | None = None
):
    """Example (x, t, text, mask) for a U-Net expert of ModelConfig `cfg`: the last rows of the batch
    (the CFG negatives) with a shorter text, so the mask is not all true."""
    g = generator or torch.Generator().manual_seed(0)
    u = cfg.unet
    x = torch.randn(batch, cfg.frames, u.channels, cfg.height, cfg.width, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, text_len, u.text_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[batch // 2 :, max(1, text_len // 2) :] = False
    return x, t, text, mask
