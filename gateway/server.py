"""The gateway's server: `build(settings)` -> (server, load, close); `python -m gateway` runs it.

The public port: API keys (gateway.servicer), TLS where the settings name a certificate, no mesh
credential (that guards the internal services; the gateway is the one that carries it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from grpc_health.v1 import health_pb2

from gateway.gateway import GatewaySettings, VideoGateway
from gateway.servicer import VideoServiceServicer, registration
from gateway.tenants import open_tenants
from videomesh.serving import Server, create_server

log = logging.getLogger("videomesh.launch")
SETTINGS = GatewaySettings


def build(settings: GatewaySettings, **options):
    tenants = open_tenants(Path(settings.data_dir), settings.database, timeout=settings.database_timeout)
    gw = VideoGateway(settings, tenants=tenants)
    server = create_server([registration(VideoServiceServicer(gw, tenants))], host=settings.host,
                           port=settings.port, **options)  # fmt: skip
    server.gateway = gw
    server.tenants = tenants
    server.drain = gw.drain  # SIGTERM: no new claims; jobs in flight finish within the grace
    monitor = DownstreamMonitor(server, gw.downstreams, wedged=gw.wedged)

    def load():
        gw.load()
        monitor.start()

    def close():
        monitor.stop()
        gw.close()
        tenants.close()

    return server, load, close


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

        if self.server.stopping:  # draining: NOT_SERVING stays, whatever the downstreams say
            return

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
