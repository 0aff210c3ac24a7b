"""Typed client SDK: channels with the mesh's retry policy, and a VideoService client.

Retries of UNAVAILABLE use gRPC's own retry machinery (service config JSON on the channel),
for unary calls only: a retried stream is held open until its first response.

Where the gateway is: an explicit address, else `$VIDEOMESH_GATEWAY`, else the file
`videomesh up` writes in the user's home (`~/.videomesh/gateway`, `$VIDEOMESH_HOME` moves it).
`up` also writes `DATA_DIR/gateway-address` for scripts, but the client never reads a file from
the current directory: one that came with a cloned folder would receive the user's API key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from videomesh.codec import MAX_MESSAGE_BYTES
from videomesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

API_KEY_ENV = "VIDEOMESH_API_KEY"
GATEWAY_ENV = "VIDEOMESH_GATEWAY"
HOME_ENV = "VIDEOMESH_HOME"
DEFAULT_DATA_DIR = "videomesh-data"  # `videomesh up`'s default --data-dir
GATEWAY_ADDRESS_FILE = "gateway-address"  # DATA_DIR/gateway-address, written by `videomesh up`
START_HINT = "start the mesh with `videomesh up` (other commands then find it), or give --gateway HOST:PORT"


def videomesh_home() -> Path:
    """~/.videomesh, or $VIDEOMESH_HOME (read at each call, so tests and tools can move it)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".videomesh")


def dev_key_file() -> Path:
    return videomesh_home() / "dev-api-key"


def gateway_file() -> Path:
    """Where `videomesh up` saves the gateway's address for the other commands."""
    return videomesh_home() / "gateway"


DEV_KEY_FILE = dev_key_file()  # as it was at import; prefer dev_key_file()


class GatewayError(RuntimeError):
    """No gateway address known, or nothing answers there. The message says what to do."""


class GatewayNotConfigured(GatewayError):
    """No --gateway, no $VIDEOMESH_GATEWAY, no address saved by `videomesh up`."""


class GatewayUnreachable(GatewayError):
    """Nothing accepts a connection at the address."""


class DownloadError(RuntimeError):
    """A download that did not arrive intact (nothing is left at the destination)."""


@dataclass(frozen=True)
class AddressRecord:
    address: str
    pid: int = 0  # the `videomesh up` process that wrote it
    stale: bool = False  # that process is gone


def write_address_file(path: Path, address: str, pid: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(f"{address}\npid {os.getpid() if pid is None else pid}\n")
    tmp.replace(path)


def read_address_file(path: Path) -> AddressRecord | None:
    try:
        lines = Path(path).read_text().split("\n")
    except OSError:
        return None
    address = lines[0].strip()
    if not address:
        return None
    pid = 0
    for line in lines[1:]:
        if line.startswith("pid ") and line[4:].strip().isdigit():
            pid = int(line[4:])
    return AddressRecord(address, pid, bool(pid) and not _alive(pid))


def remove_address_file(path: Path, address: str) -> None:
    """Remove the file if it still names `address` (another `up` may have replaced it since)."""
    rec = read_address_file(path)
    if rec is not None and rec.address == address:
        Path(path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_gateway(explicit: str | None = None) -> tuple[str, str]:
    """-> (address, where it came from): the argument, $VIDEOMESH_GATEWAY, then the files
    `videomesh up` writes. Raises GatewayError (saying how to start the mesh) when none is known."""
    if explicit:
        return explicit, "--gateway"
    if os.environ.get(GATEWAY_ENV, "").strip():
        return os.environ[GATEWAY_ENV].strip(), f"${GATEWAY_ENV}"
    # only the file in the user's own ~/.videomesh: a gateway-address file in the current directory
    # could come with a cloned folder and would receive the user's API key
    for f in (gateway_file(),):
        rec = read_address_file(f)
        if rec is not None:
            note = f", written by `videomesh up` pid {rec.pid}, which has exited" if rec.stale else ""
            return rec.address, f"{f}{note}"
    raise GatewayNotConfigured(
        f"no gateway address known (no --gateway, ${GATEWAY_ENV} or {gateway_file()}); {START_HINT}"
    )


def wait_ready(ch: grpc.Channel, address: str, source: str = "", timeout: float = 3.0) -> None:
    """Connect now; raise GatewayError at once if the connection is refused, or after `timeout`."""
    ready, failed = threading.Event(), threading.Event()

    def on_state(state):
        if state == grpc.ChannelConnectivity.READY:
            ready.set()
        elif state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            failed.set()

    ch.subscribe(on_state, try_to_connect=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready.is_set() and not failed.is_set() and time.monotonic() < deadline:
            ready.wait(0.02)
    finally:
        ch.unsubscribe(on_state)
    if not ready.is_set():
        where = f" (from {source})" if source and source != "--gateway" else ""
        raise GatewayUnreachable(f"no videomesh gateway answers at {address}{where}; {START_HINT}")


def _balancing(health_service: str = "") -> dict:
    """The service config's balancing part: round_robin over every address the target resolves to; with
    `health_service`, each address is watched over grpc.health.v1 and one that is not SERVING gets no calls
    (a replica loading its model or draining), while the others keep serving."""
    health = {"healthCheckConfig": {"serviceName": health_service}} if health_service else {}
    return {"loadBalancingConfig": [{"round_robin": {}}], **health}


def retry_service_config(
    services: list[str] | None = None,
    *,
    methods: list[tuple[str, str]] | None = None,
    attempts: int = 4,
    initial: float = 0.2,
    maximum: float = 2.0,
    health_service: str = "",
) -> str:
    """gRPC's own retry policy (UNAVAILABLE, exponential backoff) for whole services or single methods,
    and round_robin over every address the target resolves to (`ipv4:h1:p1,h2:p2`, or a DNS name with
    several records, e.g. a headless Kubernetes Service): calls spread over gateway replicas instead of
    pinning one HTTP/2 connection to the first."""
    names = [{"service": s} for s in services or ()] + [{"service": s, "method": m} for s, m in methods or ()]
    return json.dumps(
        {
            **_balancing(health_service),
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": attempts,
                        "initialBackoff": f"{initial}s",
                        "maxBackoff": f"{maximum}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


# VideoService's unary methods: the ones safe to retry transparently. Streaming calls are not:
# gRPC holds a retried stream open until its first response, so a stream to a server that died
# before replying could wait forever; the CLI re-attaches with WatchVideo instead.
def unary_methods(service: str) -> list[tuple[str, str]]:
    """(service, method) for each unary method of a videomesh.v1 service (from its descriptor)."""
    from google.protobuf import descriptor_pool

    desc = descriptor_pool.Default().FindServiceByName(service)
    return [(service, m.name) for m in desc.methods if not m.client_streaming and not m.server_streaming]


VIDEO_SERVICE_UNARY = unary_methods("videomesh.v1.VideoService")


def channel(
    address: str,
    *,
    services: list[str] | None = None,
    methods: list[tuple[str, str]] | None = None,
    retries: int = 4,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    mesh=None,
    health_service: str = "",
    root_certificates: bytes | None = None,
) -> grpc.Channel:
    """A channel with explicit size limits, round_robin over the target's addresses and (for `services` /
    `methods`) the retry policy. `mesh` (videomesh.meshauth.MeshSecrets): every call carries the mesh
    credential. `health_service`: addresses whose health for it is not SERVING get no calls.
    `root_certificates` (PEM): TLS, verifying the server against them (b"" = the system's roots)."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if (services or methods) and retries >= 2:  # gRPC refuses a policy of fewer than 2 attempts (and the
        # channel then fails every call): retries < 2 means no transparent retry at all
        config = retry_service_config(
            services, methods=methods, attempts=retries, health_service=health_service
        )
        options.append(("grpc.service_config", config))
    elif health_service:
        options.append(("grpc.service_config", json.dumps(_balancing(health_service))))
    if root_certificates is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates or None)
        ch = grpc.secure_channel(address, creds, options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    from videomesh.meshauth import with_credential

    return with_credential(ch, mesh)


def find_api_key(explicit: str | None = None) -> str | None:
    """--api-key, else $VIDEOMESH_API_KEY, else the dev key `videomesh up` wrote."""
    if explicit:
        return explicit
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    if dev_key_file().exists():
        return dev_key_file().read_text().strip()
    return None


class VideoClient:
    """The public API in a few typed calls."""

    def __init__(self, address: str | None = None, api_key: str | None = None, *, ca: str | None = None,
                 tls: bool = False):  # fmt: skip
        """`address` defaults to $VIDEOMESH_GATEWAY, then the address `videomesh up` saved. TLS: `ca`
        (a PEM file, or $VIDEOMESH_CA) verifies the gateway against that CA, `tls` (or $VIDEOMESH_TLS=1)
        against the system's roots; the address `videomesh up --tls-self-signed` saved comes with its CA."""
        from videomesh.tls import find_root_certificates

        self.address, self.address_source = find_gateway(address)
        saved = self.address_source.startswith(str(gateway_file()))
        self.root_certificates = find_root_certificates(ca, tls, saved=saved)
        self._channel = channel(
            self.address, methods=VIDEO_SERVICE_UNARY, root_certificates=self.root_certificates
        )
        self.stub = gateway_pb2_grpc.VideoServiceStub(self._channel)
        key = find_api_key(api_key)
        self._metadata = [("authorization", f"Bearer {key}")] if key else []

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def wait_ready(self, timeout: float = 3.0) -> None:
        """Raise GatewayError (saying how to start the mesh) unless the gateway accepts a connection."""
        wait_ready(self._channel, self.address, self.address_source, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def create(
        self, spec: common_pb2.VideoSpec, request_id: str = "", timeout: float | None = 30
    ) -> gateway_pb2.Video:
        """Without a `request_id` the SDK makes one for this call, so the channel's transparent retry of
        an UNAVAILABLE answer (a reply lost after the job was stored) returns the same job, not a second."""
        return self.stub.CreateVideo(
            gateway_pb2.CreateVideoRequest(spec=spec, request_id=request_id or "sdk-" + uuid.uuid4().hex),
            metadata=self._metadata,
            timeout=timeout,
        )

    def generate(
        self, spec: common_pb2.VideoSpec, request_id: str = "", timeout: float | None = None
    ) -> Iterator[gateway_pb2.VideoEvent]:
        return self.stub.GenerateVideo(
            gateway_pb2.CreateVideoRequest(spec=spec, request_id=request_id),
            metadata=self._metadata,
            timeout=timeout,
        )

    def watch(
        self, video_id: str, after: int = 0, timeout: float | None = None
    ) -> Iterator[gateway_pb2.VideoEvent]:
        return self.stub.WatchVideo(
            gateway_pb2.WatchVideoRequest(id=video_id, after_sequence=after),
            metadata=self._metadata,
            timeout=timeout,
        )

    def get(self, video_id: str) -> gateway_pb2.Video:
        return self.stub.GetVideo(
            gateway_pb2.GetVideoRequest(id=video_id), metadata=self._metadata, timeout=30
        )

    def list(
        self, page_size: int = 20, page_token: str = "", status: int = 0
    ) -> gateway_pb2.ListVideosResponse:
        return self.stub.ListVideos(
            gateway_pb2.ListVideosRequest(page_size=page_size, page_token=page_token, status=status),
            metadata=self._metadata,
            timeout=30,
        )

    def cancel(self, video_id: str, timeout: float | None = 30) -> gateway_pb2.Video:
        return self.stub.CancelVideo(
            gateway_pb2.CancelVideoRequest(id=video_id), metadata=self._metadata, timeout=timeout
        )

    def verify_watermark(self, path, chunk: int = 1 << 20) -> gateway_pb2.VerifyWatermarkResponse:
        def chunks():
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    yield gateway_pb2.VerifyWatermarkRequest(chunk=block)

        return self.stub.VerifyWatermark(chunks(), metadata=self._metadata, timeout=120)

    def delete(self, video_id: str) -> gateway_pb2.Video:
        return self.stub.DeleteVideo(
            gateway_pb2.DeleteVideoRequest(id=video_id), metadata=self._metadata, timeout=30
        )

    def feedback(self, video_id: str, rating: int, reason: str = "") -> str:
        req = gateway_pb2.SubmitFeedbackRequest(id=video_id, rating=rating, reason=reason)
        return self.stub.SubmitFeedback(req, metadata=self._metadata, timeout=30).feedback_id

    def templates(self) -> list[gateway_pb2.Template]:
        return list(
            self.stub.ListTemplates(
                gateway_pb2.ListTemplatesRequest(), metadata=self._metadata, timeout=30
            ).templates
        )

    def style_adapters(self) -> list[common_pb2.AdapterInfo]:
        """The brand style adapters this tenant may use (public ones and its own)."""
        return list(
            self.stub.ListStyleAdapters(
                gateway_pb2.ListStyleAdaptersRequest(), metadata=self._metadata, timeout=30
            ).adapters
        )

    def create_from_template(self, template_id: str, fields: dict[str, str], overrides: common_pb2.VideoSpec | None = None,
                             request_id: str = "") -> gateway_pb2.Video:  # fmt: skip
        req = gateway_pb2.CreateVideoFromTemplateRequest(template_id=template_id, fields=fields, request_id=request_id,
                                                         overrides=overrides or common_pb2.VideoSpec())  # fmt: skip
        return self.stub.CreateVideoFromTemplate(req, metadata=self._metadata, timeout=30)

    def usage(self, since_unix: int = 0) -> gateway_pb2.Usage:
        return self.stub.GetUsage(
            gateway_pb2.GetUsageRequest(since_unix=since_unix), metadata=self._metadata, timeout=30
        )

    def review(self, video_id: str, approve: bool, note: str = "") -> gateway_pb2.Video:
        return self.stub.ReviewVideo(
            gateway_pb2.ReviewVideoRequest(id=video_id, approve=approve, note=note),
            metadata=self._metadata,
            timeout=30,
        )

    def regenerate(self, video_id: str, seed: int | None = None, request_id: str = "") -> gateway_pb2.Video:
        req = gateway_pb2.RegenerateVideoRequest(id=video_id, request_id=request_id)
        if seed is not None:
            req.seed = seed
        return self.stub.RegenerateVideo(req, metadata=self._metadata, timeout=30)

    def download(self, video_id: str, path, timeout: float | None = 600) -> Path:
        """Stream a finished video's file into `path` through the gateway (DownloadVideo).

        The bytes go to a temporary file beside `path`; the trailer's size and SHA-256 are
        checked against what arrived, and that against GetVideo's `result.sha256`, before an
        atomic rename. Raises DownloadError (or the grpc.RpcError) and leaves nothing behind
        otherwise."""
        path = Path(path)
        video = self.get(video_id)
        expected = video.result.sha256
        if not expected:
            status = common_pb2.VideoStatus.Name(video.status)
            raise DownloadError(f"video {video_id} has no file to download (it is {status})")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        tmp = Path(name)
        stream = self.stub.DownloadVideo(
            gateway_pb2.DownloadVideoRequest(id=video_id), metadata=self._metadata, timeout=timeout
        )
        try:
            digest, size, trailer = hashlib.sha256(), 0, None
            with os.fdopen(fd, "wb") as f:
                for msg in stream:
                    part = msg.WhichOneof("part")
                    if trailer is not None:
                        raise DownloadError(f"video {video_id}: data arrived after the trailer")
                    if part == "chunk":
                        f.write(msg.chunk)
                        digest.update(msg.chunk)
                        size += len(msg.chunk)
                    elif part == "trailer":
                        trailer = msg.trailer
                f.flush()
                os.fsync(f.fileno())
            got = digest.hexdigest()
            if trailer is None:
                raise DownloadError(
                    f"video {video_id}: the download ended after {size} bytes without its trailer"
                )
            if trailer.size_bytes != size:
                raise DownloadError(
                    f"video {video_id}: received {size} bytes but the server says it sent {trailer.size_bytes}"
                )
            if trailer.sha256 != got:
                raise DownloadError(
                    f"video {video_id}: the bytes received hash to {got}, the server says it sent {trailer.sha256}"
                )
            if got != expected:
                raise DownloadError(
                    f"video {video_id}: the file's SHA-256 {got} does not match the video's recorded {expected}"
                )
            if video.result.size_bytes and size != video.result.size_bytes:
                raise DownloadError(
                    f"video {video_id}: {size} bytes received; the video's record says {video.result.size_bytes}"
                )
            tmp.chmod(0o644)
            tmp.replace(path)
        except BaseException:
            stream.cancel()
            tmp.unlink(missing_ok=True)
            raise
        return path
