"""create_server(): one way to stand up a videomesh gRPC server.

Every server gets the standard health service (one status per service name, NOT_SERVING
until the caller marks it ready), server reflection, explicit message-size limits, the
error interceptor (domain errors -> rich status; anything else -> INTERNAL with a reference
id, never a traceback; request bytes that are not a valid message -> INVALID_ARGUMENT, where
grpc alone answers INTERNAL), and a graceful stop: health NOT_SERVING first, then drain.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from videomesh.codec import MAX_MESSAGE_BYTES
from videomesh.errors import InvalidArgument, Unavailable, VideomeshError, to_status

log = logging.getLogger("videomesh.serving")

MAX_CONNECTION_AGE_MS = 300_000

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _abort(context: grpc.ServicerContext, err: BaseException, method: str):
    if not context.is_active() and isinstance(err, (grpc.RpcError, VideomeshError)):
        # the client went away (cancelled, deadline, its process died) while we read its stream: the call is
        # over and nobody is there to answer; not a server error. (A servicer's own error counts too: grpc
        # may hand it the cancelled stream as a clean end first, "no frames", before it marks the call.)
        log.info("%s: the client ended the call", method)
        return
    if isinstance(err, VideomeshError):
        context.abort_with_status(to_status(err))
    ref = uuid.uuid4().hex[:12]
    log.exception("unhandled error in %s (ref %s)", method, ref)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (ref {ref}); see the server log")


class _Malformed:
    """What the wrapped deserializer returns for bytes that do not parse (grpc would abort INTERNAL)."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument):
        self.error = error


def _safe_deserializer(deserialize: Callable) -> Callable:
    owner = getattr(deserialize, "__self__", None)  # Message.FromString is bound to the message class
    kind = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request message")

    def wrapped(data: bytes):
        try:
            return deserialize(data)
        except Exception as err:  # noqa: BLE001 - DecodeError, bad UTF-8, ...: all the client's bytes
            why = str(err).rpartition(": ")[2] or type(err).__name__  # "Wire format was corrupt"
            return _Malformed(
                InvalidArgument(f"request bytes are not a valid {kind} ({why})", field="request")
            )

    return wrapped


class _Requests:
    """A request stream that stops with InvalidArgument at the first malformed message, and
    remembers it: the handler answers INVALID_ARGUMENT even if the servicer swallowed the error."""

    def __init__(self, it):
        self._it = iter(it)
        self.bad: InvalidArgument | None = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.bad is not None:
            raise self.bad
        msg = next(self._it)
        if isinstance(msg, _Malformed):
            self.bad = msg.error
            raise self.bad
        return msg


def _requests(request_or_iterator, streaming: bool):
    """-> (what the servicer gets, the stream wrapper or None); raise for a malformed unary request."""
    if not streaming:
        if isinstance(request_or_iterator, _Malformed):
            raise request_or_iterator.error
        return request_or_iterator, None
    wrapped = _Requests(request_or_iterator)
    return wrapped, wrapped


def _wrap_unary(fn: Callable, method: str, streaming: bool = False, gate: Callable | None = None) -> Callable:
    def handler(request_or_iterator, context):
        requests = None
        try:
            if gate is not None:
                gate()
            request, requests = _requests(request_or_iterator, streaming)
            reply = fn(request, context)
        except Exception as err:  # noqa: BLE001 - the whole point is to map every error
            if _is_abort(err):
                raise
            _abort(context, requests.bad if requests is not None and requests.bad else err, method)
            return None  # the client had gone (see _abort): nothing to answer
        if requests is not None and requests.bad is not None:
            _abort(context, requests.bad, method)
        return reply

    return handler


def _wrap_stream(
    fn: Callable, method: str, streaming: bool = False, gate: Callable | None = None
) -> Callable:
    def handler(request_or_iterator, context):
        requests = None
        try:
            if gate is not None:
                gate()
            request, requests = _requests(request_or_iterator, streaming)
            yield from fn(request, context)
        except Exception as err:  # noqa: BLE001
            if _is_abort(err):
                raise
            _abort(context, requests.bad if requests is not None and requests.bad else err, method)
        if requests is not None and requests.bad is not None:
            _abort(context, requests.bad, method)

    return handler


def _is_abort(err: BaseException) -> bool:
    # context.abort() signals by raising a bare Exception(); let it through untouched.
    return type(err) is Exception and not err.args


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by servicers to gRPC statuses (see errors.py), and answers the
    services' own calls UNAVAILABLE with a retry delay until the server has loaded its model
    (`loaded` set by the first set_serving(True)); health and reflection answer all along."""

    def __init__(self, loaded: threading.Event | None = None, services: Iterable[str] = ()):
        self.loaded = loaded
        self.services = frozenset(services)

    def _gate(self) -> None:
        if not self.loaded.is_set():
            raise Unavailable("the service is still starting (loading its model); retry shortly", retry_after=2.0,
                              reason="NOT_READY")  # fmt: skip

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        service = method.lstrip("/").partition("/")[0]
        gate = self._gate if self.loaded is not None and service in self.services else None
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method, gate=gate))
        if handler.stream_unary:
            return handler._replace(
                stream_unary=_wrap_unary(handler.stream_unary, method, streaming=True, gate=gate)
            )
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method, gate=gate))
        if handler.stream_stream:
            return handler._replace(
                stream_stream=_wrap_stream(handler.stream_stream, method, streaming=True, gate=gate)
            )
        return handler


@dataclass
class Server:
    """A started-or-startable server with its health servicer and bound port."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str]
    host: str = "127.0.0.1"
    loaded: threading.Event = field(default_factory=threading.Event)  # set by the first set_serving(True)
    mesh_auth: object | None = None  # the MeshAuthInterceptor where the server requires the mesh credential
    rpc_metrics: object | None = None  # its MetricsInterceptor (`.calls`: this server's RPCs by method)
    # stop(grace) runs it beside gRPC's own drain of the calls in flight: what the service must wind down
    # that is not an RPC (the gateway's jobs), within the same grace
    drain: Callable[[float], None] | None = None
    health_server: grpc.Server | None = None  # serve_health(): the health service alone, in plaintext
    health_port: int = 0
    _stopped: threading.Event = field(default_factory=threading.Event)
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)  # a signal's stop and close are done

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stopping(self) -> bool:
        """stop() has begun (health NOT_SERVING for good)."""
        return self._stopped.is_set()

    def start(self) -> Server:
        self.grpc_server.start()
        return self

    def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with self._stop_lock:
            if serving and self._stopped.is_set():
                return  # stopping: NOT_SERVING for good (a late load() or health mirror must not undo it)
            if serving:
                self.loaded.set()
            for name in self.service_names:
                self.health.set(name, status)
            self.health.set("", status)

    def stop(self, grace: float = 5.0) -> None:
        """Health NOT_SERVING first (load balancers stop sending), then drain for `grace` seconds."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        self.set_serving(False)
        stopped = self.grpc_server.stop(grace)  # new calls refused now; those in flight get `grace`
        if self.drain is not None:
            try:
                self.drain(grace)
            except Exception:  # noqa: BLE001 - the stop goes on: close() still winds everything down
                log.exception("drain failed")
        stopped.wait()
        if self.health_server is not None:
            self.health_server.stop(0)

    def serve_health(self, host: str, port: int) -> int:
        """Also answer grpc.health.v1 (the same statuses) in plaintext on host:port: for probes that cannot
        speak this server's TLS. Returns the bound port; stop() stops it with the server."""
        hs = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"),
                         options=[("grpc.so_reuseport", 0)])  # fmt: skip
        health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
        bound = hs.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"could not bind the health port {host}:{port}")
        hs.start()
        self.health_server, self.health_port = hs, bound
        return bound

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()

    def stop_on_signals(self, grace: float = 5.0, on_stop: Callable[[], None] | None = None) -> None:
        """SIGTERM/SIGINT -> graceful stop (call from the main thread)."""

        started = threading.Event()

        def _handler(signum, _frame):
            if started.is_set():  # a second signal does not cut the drain short
                log.info("signal %s: already draining (up to %.0f s)", signum, grace)
                return
            started.set()
            log.info("signal %s: draining", signum)

            def _stop():
                # drain first (NOT_SERVING, calls in flight finish within `grace`), then release what
                # serves them (an engine's inference thread, the gateway's workers): closing first
                # failed in-flight work that the grace period is there to let finish
                try:
                    self.stop(grace)
                    if on_stop:
                        on_stop()
                finally:
                    self.finished.set()

            # not a daemon, and serve() waits for `finished`: the process outlives the drain
            threading.Thread(target=_stop, name="drain").start()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)


def tls_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server credentials from PEM files, re-read when they change: gRPC asks the fetcher at each new
    handshake, so a renewed certificate (cert-manager, a Kubernetes Secret updated in place) is served
    without a restart; connections already open keep theirs. A pair that fails to load keeps the last good one."""
    cert, key = Path(cert), Path(key)

    def stamp():
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (cert, key))

    def load():
        return grpc.ssl_server_certificate_configuration([(key.read_bytes(), cert.read_bytes())])

    state = {"stamp": stamp()}
    initial = load()

    def fetch():
        try:
            now = stamp()
            if now == state["stamp"]:
                return None  # unchanged: gRPC keeps the current one
            config = load()
        except (OSError, ValueError) as err:
            log.warning("TLS: cannot re-read %s / %s (%s); keeping the current certificate", cert, key, err)
            return None
        state["stamp"] = now
        log.info("TLS: certificate re-read from %s", cert)
        return config

    return grpc.dynamic_ssl_server_credentials(initial, fetch)


def create_server(
    registrations: Iterable[tuple[Callable, object, str]],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 32,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    service: str = "",
    mesh=None,
    tls: tuple[Path, Path] | None = None,
    instrument: bool = True,
) -> Server:
    """Build a server (not started) for the given (add_XServicer_to_server, servicer, full_name) triples.

    Binds host:port (port 0 = a free port). Health starts NOT_SERVING for every service;
    call `server.set_serving()` once models are loaded. `max_message_bytes` bounds what it sends
    and accepts per message (raised only where a model's text states need it: codec.TEXT_MESSAGE_BYTES).
    `service` labels its RPC metrics (videomesh.metrics; outermost, so every refusal counts too).
    `mesh` (videomesh.meshauth.MeshSecrets): every call but health and reflection must carry the mesh
    credential. `tls` (certificate chain, private key: PEM files): the port speaks TLS only, and a renewed
    pair is picked up at the next handshake (tls_credentials). `instrument`:
    metrics and traces (on; off only to measure their cost).
    """
    from videomesh import tracing
    from videomesh.meshauth import MeshAuthInterceptor
    from videomesh.metrics import MetricsInterceptor

    registrations = list(registrations)
    loaded = threading.Event()
    names = [name for _, _, name in registrations]
    rpc_metrics = MetricsInterceptor(service or (names[0] if names else "server"))
    # metrics, then a span per RPC (child of the caller's, from traceparent metadata); off only to measure
    # what they cost (scripts/bench_interceptors.py)
    outer: list[grpc.ServerInterceptor] = [rpc_metrics, tracing.server_interceptor()] if instrument else []
    mesh_auth = MeshAuthInterceptor(mesh, service) if mesh is not None else None
    if mesh_auth is not None:
        outer.append(mesh_auth)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[*outer, *interceptors, ErrorInterceptor(loaded, names)],
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # a client's connection is asked to move on (GOAWAY) after 5 minutes, so it resolves the
            # service's name again and spreads over replicas added since (an HPA's new pods); no grace
            # limit is set, so a call in flight on the old connection (a long Denoise) still finishes
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ],
        maximum_concurrent_rpcs=max_workers * 4,
    )
    for add, servicer, _name in registrations:
        add(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", tls_credentials(*tls))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    return Server(
        grpc_server=server, port=bound, health=health_servicer, service_names=names, host=host, loaded=loaded,
        mesh_auth=mesh_auth, rpc_metrics=rpc_metrics,
    )  # fmt: skip
