"""The mesh credential: a per-mesh secret every internal hop carries, checked on every internal RPC.

The encoder, denoiser, upscaler and QC services take calls only from the mesh (the gateway, which
holds the tenants' keys, quotas and content policy). A call to them without the secret in its
`x-videomesh-mesh` metadata is answered UNAUTHENTICATED before the servicer sees it.

Open without the secret: `grpc.health.v1.Health` (Kubernetes' gRPC probes, `videomesh health` and load
balancers carry no credentials; a status is all it tells) and server reflection (descriptors only,
which the published protos say anyway). Nothing else.

Where the secret comes from (never argv, never logs): `VIDEOMESH_MESH_SECRET_FILE`, a file of one or
more lines (a mounted Kubernetes Secret), else `VIDEOMESH_MESH_SECRET` (comma-separated). Every line
is accepted; the first is the one sent. Rotation without downtime: add the new secret as a second
line and roll the services (both accepted), move it to the first line and roll again (the new one
sent), then drop the old line. A file that changes is re-read within `reread` seconds, so a mounted
Secret that Kubernetes updates in place rotates without a restart at all.

Why hand-written: grpc's call credentials need a TLS channel and its auth-metadata plugins run on a
thread of their own per call; an interceptor pair is ~100 lines, works on plaintext loopback hops,
and compares in constant time. Mutual TLS is the stronger choice where a mesh (Istio, Linkerd) or a
certificate authority is at hand: deploy/README.md says how to run both.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

from videomesh.errors import Unauthenticated, to_status
from videomesh.interceptors import ClientInterceptor, with_metadata

log = logging.getLogger("videomesh.meshauth")

HEADER = "x-videomesh-mesh"
FILE_ENV = "VIDEOMESH_MESH_SECRET_FILE"
ENV = "VIDEOMESH_MESH_SECRET"
# services that answer without the mesh credential (probes and descriptors; see the module doc)
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class MeshSecrets:
    """The accepted secrets (the first is sent), from literal values or a file re-read when it changes."""

    def __init__(self, values: tuple[str, ...] = (), *, file: str | Path | None = None, reread: float = 5.0):
        self.file = Path(file) if file else None
        self.reread = reread
        self._lock = threading.Lock()
        self._values = tuple(v for v in values if v)
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        if self.file is not None:
            self._load()
        if not self._values:
            where = f"{FILE_ENV} ({self.file})" if self.file else ENV
            raise ValueError(f"the mesh secret is empty: {where} must hold at least one secret")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MeshSecrets | None:
        """The mesh's secrets from the environment, or None where none is configured."""
        env = os.environ if env is None else env
        if env.get(FILE_ENV):
            return cls(file=env[FILE_ENV])
        if env.get(ENV):
            return cls(tuple(v.strip() for v in env[ENV].split(",")))
        return None

    def _load(self) -> None:
        st = self.file.stat()
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        lines = [ln.strip() for ln in self.file.read_text().splitlines()]
        values = tuple(ln for ln in lines if ln and not ln.startswith("#"))
        if not values:  # a half-written file during a rotation: keep what worked (the caller refuses none)
            if self._values:
                log.warning("%s is empty; keeping the secrets read before", self.file)
            return
        if self._values and values != self._values:
            log.info("mesh secrets re-read from %s: %d accepted", self.file, len(values))
        self._values, self._stamp = values, stamp

    def accepted(self) -> tuple[str, ...]:
        if self.file is not None and time.monotonic() - self._checked >= self.reread:
            with self._lock:
                self._checked = time.monotonic()
                try:
                    self._load()
                except OSError as err:  # a Secret being swapped: keep the last good values
                    log.warning("cannot re-read %s (%s); keeping the secrets read before", self.file, err)
        return self._values

    def current(self) -> str:
        return self.accepted()[0]

    def check(self, sent: str | None) -> bool:
        if not sent:
            return False
        got = sent.encode()
        ok = False
        for s in self.accepted():  # every one compared, in constant time each: no early exit to time
            ok |= hmac.compare_digest(got, s.encode())
        return ok


# ---------------------------------------------------------------------------------------------- server


def _refusal(handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading the request."""
    status = to_status(Unauthenticated(message))

    def unary(_request, context):
        context.abort_with_status(status)

    def stream(_request, context):
        context.abort_with_status(status)
        yield  # pragma: no cover - abort raises

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.stream_stream_rpc_method_handler(stream)


class MeshAuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for any call to a service but health and reflection that lacks the mesh secret."""

    def __init__(self, secrets: MeshSecrets, service: str = ""):
        self.secrets = secrets
        self.service = service
        self.refused = 0
        self._last_log = 0.0

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return continuation(handler_call_details)
        sent = None
        for k, v in handler_call_details.invocation_metadata or ():
            if k == HEADER:
                sent = v if isinstance(v, str) else v.decode("latin-1")
                break
        if self.secrets.check(sent):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: UNIMPLEMENTED says no more than the protos
            return None
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log > 10:  # a scan is logged, not each of its calls
            self._last_log = now
            log.warning("%s: refused %s without a valid mesh credential (%d refused so far)",
                        self.service or "service", method, self.refused)  # fmt: skip
        why = "a wrong mesh credential" if sent else "no mesh credential"
        return _refusal(
            handler,
            method,
            f"{method} is internal to the mesh and the call carried {why} ({HEADER} metadata, from "
            f"{FILE_ENV}); clients call the gateway",
        )


# ---------------------------------------------------------------------------------------------- client


class MeshCredential(ClientInterceptor):
    """Adds the mesh secret (the first accepted one, read afresh) to every call on a channel."""

    def __init__(self, secrets: MeshSecrets):
        self.secrets = secrets

    def call(self, continuation, details, request):
        return continuation(with_metadata(details, [(HEADER, self.secrets.current())]), request)


def with_credential(channel: grpc.Channel, secrets: MeshSecrets | None) -> grpc.Channel:
    """`channel`, carrying the mesh secret on every call where one is configured."""
    return channel if secrets is None else grpc.intercept_channel(channel, MeshCredential(secrets))
