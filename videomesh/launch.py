"""Start-up of every service: settings -> server -> load model -> SERVING -> wait -> drain.

`python -m services.encoder`, `videomesh serve encoder` and `videomesh up` all come here.
`build(name, settings)` is separate from `main()` so tests run the same servers in-process
on port 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

# Before anything loads torch's OpenMP runtime (libgomp reads these once): idle OpenMP workers spin
# only briefly (1000 rounds, not libgomp's 300,000) before they sleep. A service shares its cores with
# the other services and its own gRPC, OpenCV and ffmpeg threads, and spinning workers starved them.
# Measured on this 2-core VM: 8 tiny-Wan jobs at once through the mesh took 5.87 s with libgomp's
# defaults, 1.18 s with GOMP_SPINCOUNT=1000 and 1.01 s with OMP_WAIT_POLICY=PASSIVE; one default-model
# generation alone took 2.61 / 2.66 / 2.87 s. An operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from grpc_health.v1 import health_pb2  # noqa: E402

from videomesh import config  # noqa: E402
from videomesh.serving import Server, create_server  # noqa: E402

log = logging.getLogger("videomesh.launch")
NAMES = ("encoder", "denoiser", "upscaler", "qc", "gateway")


def settings_class(name: str):
    if name == "encoder":
        from services.encoder.encoder import EncoderSettings

        return EncoderSettings
    if name == "denoiser":
        from services.denoiser.engine import DenoiserSettings

        return DenoiserSettings
    if name == "upscaler":
        from services.upscaler.upscaler import UpscalerSettings

        return UpscalerSettings
    if name == "qc":
        from services.qc.settings import QCSettings

        return QCSettings
    if name == "gateway":
        from gateway.gateway import GatewaySettings

        return GatewaySettings
    raise ValueError(f"unknown service {name!r}; one of {', '.join(NAMES)}")


def load_settings(name: str, *, env: dict | None = None, **overrides):
    return config.load(settings_class(name), f"VIDEOMESH_{name.upper()}_", env=env, **overrides)


def _threads(n: int) -> None:
    """torch's intra-op threads, once per process: `n`, or the cores this process may use."""
    from videomesh.inference import set_torch_threads

    set_torch_threads(n)


def _text_message_limit(settings) -> int:
    """The denoiser's message limit: its own setting where it has one, else raised for wan2.2 (a
    DenoiseRequest carries two 512 x 4096 bf16 text states, 8 MiB; see codec.TEXT_MESSAGE_BYTES)."""
    from videomesh.codec import MAX_MESSAGE_BYTES, TEXT_MESSAGE_BYTES

    own = getattr(settings, "max_message_bytes", 0)
    return own or (TEXT_MESSAGE_BYTES if getattr(settings, "model", "") == "wan2.2" else MAX_MESSAGE_BYTES)


def build(name: str, settings) -> tuple[Server, Callable[[], None], Callable[[], None]]:
    """-> (server, load, close). The server is not started; load() brings it to SERVING."""
    if name == "encoder":
        from services.encoder.encoder import TextEncoding
        from services.encoder.servicer import TextEncoderServicer, registration

        domain = TextEncoding(settings)
        servicer = TextEncoderServicer(domain)
        server = create_server([registration(servicer)], host=settings.host, port=settings.port,
                               max_message_bytes=settings.message_limit)  # fmt: skip
        server.servicer = servicer

        def load():
            _threads(settings.threads)
            domain.load()

        return server, load, domain.close
    if name == "denoiser":
        from services.denoiser.engine import WAN, load_backend
        from services.denoiser.executors import make_executor
        from services.denoiser.servicer import DenoiserServicer, registration
        from videomesh.inference import InferenceThread

        servicer = DenoiserServicer()  # the backend and executor are attached once loaded
        server = create_server([registration(servicer)], host=settings.host, port=settings.port,
                               max_message_bytes=_text_message_limit(settings))  # fmt: skip
        server.servicer = servicer  # tests read servicer.active

        # the model loads on the thread that will run it (the executor's scheduler): one torch thread pool
        worker = InferenceThread("denoiser", settings.threads)

        def load():
            _threads(settings.threads)
            # a Ray driver of Wan loads no expert (the shards do): it starts, steps and decodes requests
            ray_driver = settings.executor == "ray" and settings.model == WAN
            backend = worker.call(load_backend, settings, experts=() if ray_driver else None)
            executor = make_executor(backend, settings, worker)
            executor.start()
            servicer.attach(backend, executor)

        def close():
            servicer.close()
            worker.close()

        return server, load, close
    if name == "upscaler":
        from services.upscaler.servicer import UpscalerServicer, registration
        from services.upscaler.upscaler import SpatialUpscaler
        from videomesh.inference import InferenceThread

        spatial = SpatialUpscaler(settings)
        worker = InferenceThread("upscaler", settings.threads)  # the SR net loads and runs on it
        server = create_server(
            [registration(UpscalerServicer(spatial, worker))], host=settings.host, port=settings.port
        )

        def load():
            _threads(settings.threads)
            worker.call(spatial.load)

        return server, load, worker.close
    if name == "qc":
        from services.qc.servicer import QualityCheckServicer, registration

        settings.apply_threads()  # OpenCV's threads: every usable core unless the settings say
        servicer = QualityCheckServicer(settings.thresholds(), faces=settings.faces)
        server = create_server([registration(servicer)], host=settings.host, port=settings.port)
        return server, lambda: None, lambda: None
    if name == "gateway":
        from gateway.gateway import VideoGateway
        from gateway.servicer import VideoServiceServicer, registration
        from gateway.tenants import TenantDirectory

        tenants = TenantDirectory(Path(settings.data_dir) / "tenants.json")
        gw = VideoGateway(settings, tenants=tenants)
        server = create_server(
            [registration(VideoServiceServicer(gw, tenants))], host=settings.host, port=settings.port
        )
        server.gateway = gw
        server.tenants = tenants
        monitor = DownstreamMonitor(server, gw.downstreams, wedged=gw.wedged)

        def load():
            gw.load()
            monitor.start()
            if settings.metrics_port >= 0:
                from gateway.metrics import serve_metrics

                server.metrics_port = serve_metrics(settings.host, settings.metrics_port)
                log.info("metrics on http://%s:%d/metrics", settings.host, server.metrics_port)

        def close():
            monitor.stop()
            gw.close()

        return server, load, close
    raise ValueError(f"unknown service {name!r}")


class DownstreamMonitor:
    """Mirrors each downstream's health into the gateway's own health service, so one
    probe of the gateway (`videomesh health`) shows the whole mesh. It reads health through
    the gateway's Downstreams, so each poll is also the fresh reading the recovery gate uses
    (one Check per downstream per interval, not two)."""

    def __init__(
        self,
        server: Server,
        downstreams,  # gateway.pipeline.Downstreams
        interval: float = 1.0,
        wedged: Callable[[], bool] | None = None,
    ):
        self.server = server
        self.downstreams = downstreams
        self.breakers = downstreams.breakers
        self.interval = interval
        self.wedged = wedged  # the gateway's own liveness: every worker stuck -> NOT_SERVING
        self._was_wedged = False
        self._stop = threading.Event()
        self.status: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="downstream-health", daemon=True)

    def start(self) -> None:
        self.poll()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        from gateway.pipeline import SERVICE_NAMES

        for key, svc in SERVICE_NAMES.items():
            status = self.downstreams.status(key, max_age=0)
            self.status[key] = status
            self.server.health.set(svc, status)
            if status == health_pb2.HealthCheckResponse.SERVING and key in self.breakers:
                self.breakers[key].healthy()  # an open circuit may probe the service again
        if self.wedged is not None:
            wedged = self.wedged()
            if wedged != self._was_wedged:
                log.error("the gateway's workers are all stuck: health NOT_SERVING") if wedged else log.info(
                    "the gateway's workers are free again: health SERVING"
                )
                self.server.set_serving(not wedged)
                self._was_wedged = wedged

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except ValueError:  # the gateway closed its channels while stopping: nothing left to mirror
                if self._stop.is_set() or getattr(self.downstreams, "closed", False):
                    return
                raise


def start(name: str, settings, *, port_file: str | None = None, before_load: Callable | None = None):
    """Build, listen (health NOT_SERVING), write the port file, load the model, then SERVING: what every
    service process does before it waits. `before_load(server, close)` runs while the service is listening
    but not loaded (serve() installs its signal handlers there). Returns (server, close)."""
    server, load, close = build(name, settings)
    server.start()
    if port_file:
        tmp = port_file + ".tmp"
        Path(tmp).write_text(str(server.port))
        os.replace(tmp, port_file)
    log.info("%s listening on %s (NOT_SERVING until loaded)", name, server.address)
    if before_load is not None:
        before_load(server, close)
    load()
    server.set_serving(True)
    log.info("%s SERVING on %s", name, server.address)
    return server, close


def serve(name: str, settings, *, port_file: str | None = None, grace: float = 10.0) -> None:
    server, _ = start(name, settings, port_file=port_file,
                      before_load=lambda srv, close: srv.stop_on_signals(grace, on_stop=close))  # fmt: skip
    server.wait()


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free port)")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--model", default=None, help="model name (encoder, denoiser): default or wan2.2")
    p.add_argument(
        "--model-dir", default=None, help="encoder, denoiser: the diffusers-layout directory (wan2.2)"
    )
    p.add_argument("--data-dir", default=None, help="gateway: where jobs, keys and videos live")
    for d in ("encoder", "denoiser", "upscaler", "qc"):
        p.add_argument(f"--{d}", default=None, help=f"gateway: address of the {d} service")
    p.add_argument("--log-level", default=os.environ.get("VIDEOMESH_LOG_LEVEL", "INFO"))


def overrides_from(name: str, args: argparse.Namespace) -> dict:
    cls = settings_class(name)
    fields = set(cls.__dataclass_fields__)
    out = {}
    for k in ("host", "port", "model", "encoder", "denoiser", "upscaler", "qc"):
        v = getattr(args, k, None)
        if v is not None and k in fields:
            out[k] = v
    if getattr(args, "data_dir", None) and "data_dir" in fields:
        out["data_dir"] = Path(args.data_dir)
    if getattr(args, "model_dir", None) and "model_dir" in fields:
        out["model_dir"] = Path(args.model_dir)
    return out


def main(name: str, argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"videomesh serve {name}")
    add_common_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(message)s")
    settings = load_settings(name, **overrides_from(name, args))
    serve(name, settings, port_file=args.port_file)


if __name__ == "__main__":
    import sys

    main(sys.argv[1], sys.argv[2:])
