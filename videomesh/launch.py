"""Start-up of every service: settings -> server -> load model -> SERVING -> wait -> drain.

`python -m services.encoder`, `videomesh serve encoder` and `videomesh up` all come here.
`build(name, settings)` is separate from `main()` so tests run the same servers in-process
on port 0.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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

from videomesh import config  # noqa: E402
from videomesh.serving import Server  # noqa: E402

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


SERVER_MODULES = {
    "encoder": "services.encoder.server",
    "denoiser": "services.denoiser.server",
    "upscaler": "services.upscaler.server",
    "qc": "services.qc.server",
    "gateway": "gateway.server",
}
LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def server_options(name: str, settings, env: dict | None = None) -> dict:
    """What every server gets beside its own wiring: its metrics label, the mesh credential the internal
    services require (videomesh.meshauth), the gateway's TLS. An internal service that listens beyond
    this machine without a mesh secret does not start: it would be an open back door past the gateway."""
    from videomesh.meshauth import FILE_ENV, MeshSecrets

    options: dict = {"service": name}
    if name == "gateway":
        if settings.tls_cert is not None:
            options["tls"] = (Path(settings.tls_cert), Path(settings.tls_key))
        return options
    mesh = MeshSecrets.from_env(env)
    if mesh is None:
        if not str(settings.host).startswith(LOOPBACK):
            raise config.ConfigError(
                f"{name} would listen on {settings.host} without a mesh secret: set {FILE_ENV} (a file of the "
                f"secret every internal call must carry; deploy/README.md) or bind 127.0.0.1"
            )
        log.warning("%s: no mesh secret (%s): calls from this machine are not authenticated", name, FILE_ENV)
    options["mesh"] = mesh
    return options


def build(name: str, settings) -> tuple[Server, Callable[[], None], Callable[[], None]]:
    """-> (server, load, close), from the service's own module (services/<name>/server.py,
    gateway/server.py). The server is not started; load() brings it to SERVING."""
    if name not in SERVER_MODULES:
        raise ValueError(f"unknown service {name!r}; one of {', '.join(NAMES)}")
    module = importlib.import_module(SERVER_MODULES[name])
    return module.build(settings, **server_options(name, settings))


def start(name: str, settings, *, port_file: str | None = None, before_load: Callable | None = None):
    """Build, listen (health NOT_SERVING), write the port file, load the model, then SERVING: what every
    service process does before it waits. `before_load(server, close)` runs while the service is listening
    but not loaded (serve() installs its signal handlers there). Returns (server, close)."""
    from videomesh import tracing

    tracing.setup(name)
    server, load, close = build(name, settings)
    server.start()
    if port_file:
        tmp = port_file + ".tmp"
        Path(tmp).write_text(str(server.port))
        os.replace(tmp, port_file)
    log.info("%s listening on %s (NOT_SERVING until loaded)", name, server.address)
    if getattr(settings, "health_port", -1) >= 0:
        server.serve_health(settings.host, settings.health_port)
        log.info("%s health (plaintext, for probes) on %s:%d", name, settings.host, server.health_port)
    if getattr(settings, "metrics_port", -1) >= 0:
        from videomesh.metrics import serve_metrics

        server.metrics_port = serve_metrics(settings.host, settings.metrics_port)
        log.info("%s metrics on http://%s:%d/metrics", name, settings.host, server.metrics_port)
    if before_load is not None:
        before_load(server, close)
    load()
    server.set_serving(True)
    log.info("%s SERVING on %s", name, server.address)
    return server, close


GRACE_ENV = "VIDEOMESH_GRACE_SECONDS"  # SIGTERM -> NOT_SERVING, then this long for work in flight


def serve(name: str, settings, *, port_file: str | None = None, grace: float | None = None) -> None:
    grace = float(os.environ.get(GRACE_ENV, "10")) if grace is None else grace
    server, _ = start(name, settings, port_file=port_file,
                      before_load=lambda srv, close: srv.stop_on_signals(grace, on_stop=close))  # fmt: skip
    server.wait()  # returns once gRPC has stopped: the drain's own work (the gateway's jobs) may go on
    if not server.finished.wait(grace + 30):
        log.warning("%s: the drain did not finish within %.0f s; exiting anyway", name, grace + 30)


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
    p.add_argument("--log-format", default=None, choices=["text", "json"],
                   help="text lines, or one JSON object per line with job, tenant and trace ids "
                        "(default: $VIDEOMESH_LOG_FORMAT, else text)")  # fmt: skip


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
    from videomesh.logs import configure

    try:
        configure(name, args.log_level, args.log_format)
    except ValueError as err:
        p.error(str(err))
    settings = load_settings(name, **overrides_from(name, args))
    serve(name, settings, port_file=args.port_file)


if __name__ == "__main__":
    import sys

    main(sys.argv[1], sys.argv[2:])
