"""In-process mesh for tests: every service a real gRPC server on 127.0.0.1, port 0."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf import descriptor_pool

from videomesh import probe
from videomesh.launch import load_settings, start
from videomesh.serving import Server


def start_service(name: str, **overrides) -> tuple[Server, callable]:
    """The service as its process starts it (launch.start), in this process on a free port."""
    server, close = start(name, _settings(name, **overrides))

    def stop():
        close()
        server.stop(0.5)

    return server, stop


def start_downstreams() -> tuple[dict[str, Server], list]:
    """The four internal services (the tiny model) in this process: -> ({name: server}, [stop, ...])."""
    servers, stops = {}, []
    for name, kw in (
        ("encoder", {"model": "tiny"}),
        ("denoiser", {"model": "tiny"}),
        ("upscaler", {}),
        ("qc", {}),
    ):
        servers[name], stop = start_service(name, **kw)
        stops.append(stop)
    return servers, stops


def _settings(name: str, **overrides):
    return load_settings(name, env={}, **overrides)  # tests ignore the developer's VIDEOMESH_* variables


def health_status(address: str, service: str) -> int:
    return probe.check(address, service, timeout=5)


class InProcessMesh:
    """encoder + denoiser + upscaler + qc + gateway, in this process, for fast tests."""

    def __init__(
        self, data_dir: Path, *, model: str = "tiny", gateway: dict | None = None, qc: dict | None = None,
        denoiser: dict | None = None, database: str = "",
    ):  # fmt: skip
        """`database`: "" (SQLite) or a PostgreSQL URL (tests.pg), with the local storage marked shared."""
        self.servers: dict[str, Server] = {}
        self._stops = []
        for name, kw in (
            ("encoder", {"model": "tiny" if model == "tiny" else "default"}),
            ("denoiser", {"model": model, **(denoiser or {})}),
            ("upscaler", {}),
            ("qc", qc or {}),
        ):
            srv, stop = start_service(name, **kw)
            self.servers[name] = srv
            self._stops.append(stop)
        gw_kw = {
            "data_dir": Path(data_dir),
            "encoder": self.servers["encoder"].address,
            "denoiser": self.servers["denoiser"].address,
            "upscaler": self.servers["upscaler"].address,
            "qc": self.servers["qc"].address,
            "sizes": ("64x64", "32x32", "48x64"),
            "default_size": "64x64",
            "fps_choices": (8.0, 12.0),
            "default_fps": 8.0,
            **({"database": database, "shared_storage": True} if database else {}),
            **(gateway or {}),
        }
        self._gw_kw = gw_kw
        self._start_gateway()

    def _start_gateway(self, **extra) -> None:
        srv, stop = start_service("gateway", **{**self._gw_kw, **extra})
        self.servers["gateway"] = srv
        self._gw_stop = stop
        self.gateway = srv.gateway
        self.tenants = srv.tenants
        self.address = srv.address

    def restart_gateway(self, **extra) -> None:
        """Stop the gateway (work in flight is abandoned, as in a crash) and start a new one on the same data."""
        self._gw_stop()
        self.gateway.store.close()
        self._start_gateway(**extra)

    def stop(self) -> None:
        self._gw_stop()
        for s in self._stops:
            s()


def random_adapter(name: str, seed: int, scale: float = 0.3):
    """Random deltas for the tiny model: enough to change every clip visibly."""
    import torch

    from services.denoiser import lora
    from services.denoiser.model import MODELS, MoEDenoiser

    model = MoEDenoiser(MODELS["tiny"])
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, mod in lora.adaptable(model, lora.LoRAConfig()).items():
        fan_in, out = mod.weight[0].numel(), mod.weight.shape[0]
        layers[path] = (
            torch.randn(2, fan_in, generator=g) / fan_in**0.5,
            torch.randn(out, 2, generator=g) * scale,
        )
    return lora.Adapter(name, "tiny", 2, 2.0, layers, f"test adapter {name}")


def random_tiny_engine(adapters_dir: Path | None = None):
    """The tiny built-in denoiser, loaded, with random weights: untrained tiny weights predict zero, so
    this makes every output depend on everything."""
    import torch

    from services.denoiser.engine import DenoiserEngine, DenoiserSettings

    e = DenoiserEngine(DenoiserSettings(model="tiny", adapters_dir=adapters_dir))
    e.load()
    torch.manual_seed(1)
    for p in e.model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return e


def tiny_job(seed: int = 0, length: int = 5, **fields):
    """A DenoiseJob for the tiny model: random texts of `length` tokens (negative: 2) from `seed`."""
    import torch

    from services.denoiser.backends.base import DenoiseJob

    g = torch.Generator().manual_seed(seed)
    kw = dict(frames=4, height=16, width=16, seed=seed, steps=4, guidance=0.0)
    kw.update(fields)
    return DenoiseJob(torch.randn(1, length, 32, generator=g), torch.ones(1, length, dtype=torch.bool),
                      torch.randn(1, 2, 32, generator=g), torch.ones(1, 2, dtype=torch.bool), **kw)  # fmt: skip


def run_concurrently(executor, jobs, timeout: float = 120.0) -> list:
    """executor.run(job) for every job at once, a thread each; their frames in order (errors raised)."""
    import threading

    out: dict[int, object] = {}
    errors: list[BaseException] = []

    def one(i, job):
        try:
            out[i] = executor.run(job)
        except BaseException as err:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors
    return [out[i] for i in range(len(jobs))]


def methods(service: str) -> list:
    """The MethodDescriptors of a gRPC service by full name ('videomesh.v1.TextEncoder')."""
    return list(descriptor_pool.Default().FindServiceByName(service).methods)


def raw_call(
    ch: grpc.Channel, method, body: bytes = b"", metadata=(), timeout: float = 10
) -> grpc.StatusCode:
    """One call of `method` (a MethodDescriptor) with raw request bytes (one message on a request stream),
    the replies read to the end: -> the status code."""
    ident = lambda b: b  # noqa: E731 - raw bytes both ways
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    rpc = getattr(ch, kind)(f"/{method.containing_service.full_name}/{method.name}", ident, ident)
    try:
        reply = rpc(iter([body]) if method.client_streaming else body, timeout=timeout, metadata=metadata)
        if method.server_streaming:
            list(reply)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK
