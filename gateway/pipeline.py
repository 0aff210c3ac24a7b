"""One job through the mesh: encode → denoise → upscale (→ QC and MP4 in parallel) → store.

Frames flow stage to stage in chunks: every upscaled frame goes to the ffmpeg pipe and to
the streaming QC call as soon as it arrives. Every downstream call carries the job's
remaining deadline and is registered with the job's control, so cancelling the job
cancels the in-flight RPC and the denoiser stops at its next step.
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from gateway.breaker import CircuitBreaker
from gateway.media import Mp4Writer
from gateway.metrics import METRICS
from gateway.storage import Storage
from gateway.watermark import InvisibleWatermark, VisibleMark
from videomesh import codec, probe
from videomesh.client import channel, unary_methods
from videomesh.errors import Cancelled, DeadlineExceeded, Unavailable, VideomeshError, from_rpc_error
from videomesh.meshauth import MeshSecrets
from videomesh.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    gateway_pb2,
    qc_pb2,
    qc_pb2_grpc,
    upscaler_pb2,
    upscaler_pb2_grpc,
)

# share of the whole job's progress bar per stage: (start %, end %)
PROGRESS = {
    common_pb2.STAGE_TEXT_ENCODING: (0.0, 3.0),
    common_pb2.STAGE_DENOISING: (3.0, 75.0),
    common_pb2.STAGE_UPSCALING: (75.0, 95.0),
    common_pb2.STAGE_QUALITY_CHECK: (95.0, 97.0),
    common_pb2.STAGE_MUXING: (97.0, 98.0),
    common_pb2.STAGE_STORING: (98.0, 100.0),
}
QC_FRAMES_PER_CHUNK = 4


class Downstreams:
    """Stubs for the four internal services and a circuit breaker each.

    Only unary calls get the channel's transparent retry policy (Encode, GetModelInfo). A
    streaming call is never retried transparently: gRPC holds a retried stream open until its
    first response, so a server that died before replying left the call waiting forever
    (measured on main: a Denoise on a retrying channel to a killed server never returned; without
    the policy it failed UNAVAILABLE in 0.01 s). Jobs retry instead, with backoff (gateway.py).
    """

    def __init__(self, encoder: str, denoiser: str, upscaler: str, qc: str, retries: int = 4, *,
                 breaker_threshold: int = 3, breaker_cooldown: float = 10.0,
                 text_message_bytes: int = codec.TEXT_MESSAGE_BYTES, mesh: MeshSecrets | None = None):  # fmt: skip
        self.addresses = {"encoder": encoder, "denoiser": denoiser, "upscaler": upscaler, "qc": qc}
        self.breakers = {n: CircuitBreaker(n, breaker_threshold, breaker_cooldown) for n in self.addresses}
        # The encoder's reply and the DenoiseRequest carry two text states (Wan: 2 x 4 MiB in bf16), so
        # those two channels take `text_message_bytes`; the frame hops stay at 4 MiB (frames travel in
        # chunks). The encoder and denoiser servers bound what they send and accept themselves.
        limits = {"encoder": text_message_bytes, "denoiser": text_message_bytes}
        # Every call carries the mesh credential (videomesh.meshauth) where the mesh has one. An address
        # that resolves to several replicas (`ipv4:h:p1,h:p2`, a headless Service's DNS name) is balanced
        # round_robin, and a replica whose health is not SERVING gets no calls (the channel's health checks).
        self.channels = {
            name: traced_channel(
                address,
                methods=unary_methods(SERVICE_NAMES[name]),  # Encode, GetModelInfo
                retries=retries,
                max_message_bytes=limits.get(name, codec.MAX_MESSAGE_BYTES),
                mesh=mesh,
                health_service=SERVICE_NAMES[name],
            )
            for name, address in self.addresses.items()
        }
        self.encoder = encoder_pb2_grpc.TextEncoderStub(self.channels["encoder"])
        self.denoiser = denoiser_pb2_grpc.DenoiserStub(self.channels["denoiser"])
        self.upscaler = upscaler_pb2_grpc.UpscalerStub(self.channels["upscaler"])
        self.qc = qc_pb2_grpc.QualityCheckStub(self.channels["qc"])
        self._health: dict[str, tuple[float, int]] = {}  # name -> (monotonic time read, status)
        self.closed = False
        self._health_lock = threading.Lock()

    def status(self, name: str, max_age: float = 1.0) -> int:
        """The downstream's grpc.health.v1 status (read at most every `max_age` s; NOT_SERVING if unreachable)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with self._health_lock:
            read, st = self._health.get(name, (-1e9, 0))
            if time.monotonic() - read < max_age:
                return st
        try:
            st = (
                health_pb2_grpc.HealthStub(self.channels[name])
                .Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name]), timeout=2)
                .status
            )
        except grpc.RpcError:
            st = health_pb2.HealthCheckResponse.NOT_SERVING
        with self._health_lock:
            self._health[name] = (time.monotonic(), st)
        return st

    def replicas(self, name: str, limit: int = 8) -> dict[str, int | None]:
        """Each address the target of `name` resolves to (at most `limit`) -> its health status, None where
        nothing answered: asked of each directly (health needs no credential)."""
        out: dict[str, int | None] = {}
        for address in resolve(self.addresses[name])[:limit]:
            try:
                out[address] = probe.check(address, SERVICE_NAMES[name], timeout=1.0)
            except grpc.RpcError:
                out[address] = None
        return out

    def starting(self, name: str) -> bool:
        """Whether some replica of `name` answers its health check but is not SERVING (loading its model,
        draining); a replica that does not answer at all is down, not starting."""
        from grpc_health.v1 import health_pb2

        serving = health_pb2.HealthCheckResponse.SERVING
        return any(st is not None and st != serving for st in self.replicas(name).values())

    def serving_replicas(self, name: str, limit: int = 64) -> int:
        """How many replicas of `name` are SERVING now. A dual-stack name gives each pod an IPv4 and an IPv6
        address: the larger of the two families' counts, not their sum."""
        from grpc_health.v1 import health_pb2

        serving = health_pb2.HealthCheckResponse.SERVING
        up = [a for a, st in self.replicas(name, limit).items() if st == serving]
        v6 = sum(a.startswith("[") for a in up)
        return max(v6, len(up) - v6)

    def not_serving(self) -> list[str]:
        """The downstreams whose health is not SERVING right now."""
        from grpc_health.v1 import health_pb2

        return [n for n in self.addresses if self.status(n) != health_pb2.HealthCheckResponse.SERVING]

    def close(self) -> None:
        self.closed = True  # readers (the health mirror) stop instead of calling on closed channels
        for ch in self.channels.values():
            ch.close()


def resolve(target: str) -> list[str]:
    """The host:port addresses a gRPC target names: `ipv4:a:p,b:p` / `ipv6:[a]:p,…` as listed, `dns:///h:p`
    and `h:p` through the resolver (a headless Service's name gives every pod)."""
    import socket

    if target.startswith(("ipv4:", "ipv6:")):
        return [a for a in target.split(":", 1)[1].split(",") if a]
    hostport = target.removeprefix("dns:").lstrip("/")
    if "/" in hostport:  # dns://authority/host:port
        hostport = hostport.split("/", 1)[1]
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return [hostport]
    out = []
    for family, *_, sockaddr in infos:
        a = f"[{sockaddr[0]}]:{sockaddr[1]}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{sockaddr[1]}"
        if a not in out:
            out.append(a)
    return out


def traced_channel(address: str, **kw) -> grpc.Channel:
    """client.channel, with OpenTelemetry's client interceptor: each call is a span of the job's trace."""
    from videomesh import tracing

    return tracing.traced(channel(address, **kw))


# the downstreams' full service names, from the generated descriptors (as each servicer's SERVICE_NAME)
SERVICE_NAMES = {name: full for name, full in probe.SERVICE_NAMES.items() if name != "gateway"}  # downstreams


@dataclass
class JobControl:
    """What a running job needs from the scheduler: cancellation, deadline, progress reporting,
    and a liveness clock the gateway's watchdog reads (a stage that sends nothing for too long
    is stalled: its calls are cancelled and the attempt fails UNAVAILABLE, to be retried)."""

    report: Callable[[int, int, int, float], None]  # (stage, step, total, percent)
    stage: Callable[[int], None]
    warn: Callable[[str, str], None] = lambda reason, message: None  # a Warning event for the user
    deadline: float | None = None  # time.monotonic() deadline
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    stopped_for_shutdown: bool = False
    lease_lost: bool = False  # another replica took the job over: this attempt writes nothing more
    fence: object = None  # gateway.jobs.Fence carried by this attempt's writes (set by the runner)
    stalled: str = ""  # why the watchdog stopped the attempt; empty = it did not
    last_activity: float = field(default_factory=time.monotonic)
    _calls: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def track(self, call) -> None:
        with self._lock:
            self._calls.append(call)
        if self.cancelled.is_set() or self.stalled:
            call.cancel()

    def touch(self) -> None:
        """Something arrived from a downstream: the job is alive."""
        self.last_activity = time.monotonic()

    def shutdown(self) -> None:
        """The gateway is stopping: abandon the attempt (the job re-runs after restart)."""
        self.stopped_for_shutdown = True
        self.cancel("gateway shutting down")

    def lose_lease(self) -> None:
        """The job's lease went to another replica: abandon the attempt without a word."""
        self.lease_lost = True
        self.cancel("lease lost")

    def cancel(self, reason: str = "") -> None:
        self.reason = self.reason or reason
        self.cancelled.set()
        self._cancel_calls()

    def stall(self, why: str) -> None:
        """The watchdog's verdict: stop this attempt's calls; the attempt fails UNAVAILABLE."""
        self.stalled = why
        self._cancel_calls()

    def _cancel_calls(self) -> None:
        with self._lock:
            calls = list(self._calls)
        for c in calls:
            c.cancel()

    def remaining(self, cap: float | None = None) -> float | None:
        """Seconds left of the job's budget (at most `cap`, a per-stage bound)."""
        if self.deadline is None:
            return cap
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the job's deadline passed")
        return left if cap is None else min(left, cap)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled")
        if self.stalled:
            raise Unavailable(self.stalled)
        self.remaining()


@dataclass(frozen=True)
class Plan:
    """A normalised spec turned into what each stage needs."""

    prompt: str
    negative: str
    base_frames: int
    base_width: int
    base_height: int
    base_fps: float
    width: int
    height: int
    fps: float
    frames: int
    seed: int
    steps: int
    guidance: float
    encoder_model: str
    guidance_2: float = 0.0  # the low-noise expert's scale; 0 = guidance (or the model's)
    expect_motion: bool = True
    watermark: str = ""  # invisible payload (hex); empty = none
    visible_mark: bool = False
    adapter: str = ""  # brand style adapter (LoRA) for the denoiser
    adapter_strength: float = 0.0
    step_cache: float = 0.0  # the denoiser's step-caching threshold; 0 = off


@dataclass
class Outcome:
    result: gateway_pb2.VideoResult
    quality: common_pb2.QualityReport
    seconds: dict[str, float]


STAGES = ("encoder", "denoiser", "upscaler", "qc")


class Slots:
    """A counting semaphore whose limit can change while it is held, which threading.Semaphore's cannot:
    the stage slots follow the denoiser replicas as they come and go. A lower limit takes effect as the
    holders release."""

    def __init__(self, limit: int):
        self._cond = threading.Condition()
        self.limit = limit
        self.held = 0

    def acquire(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self.held < self.limit, timeout):
                return False
            self.held += 1
            return True

    def release(self) -> None:
        with self._cond:
            if self.held <= 0:
                raise ValueError("Slots released more often than acquired")
            self.held -= 1
            self._cond.notify()

    def resize(self, limit: int) -> None:
        with self._cond:
            self.limit = limit
            self._cond.notify_all()


class Pipeline:
    def __init__(self, downstreams: Downstreams, storage: Storage, work_dir: Path, slots: tuple[int, ...] = (4, 1, 2, 4),
                 invisible: InvisibleWatermark | None = None, visible: VisibleMark | None = None,
                 encode_timeout: float = 60.0):  # fmt: skip
        self.ds = downstreams
        self.invisible = invisible or InvisibleWatermark()
        self.visible = visible or VisibleMark()
        self.storage = storage
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.encode_timeout = encode_timeout
        # bounded concurrency per stage: a job waits for a slot instead of overloading a downstream
        self.slots = {name: Slots(n) for name, n in zip(STAGES, slots, strict=True)}

    def resize(self, slots: tuple[int, ...]) -> None:
        for name, n in zip(STAGES, slots, strict=True):
            self.slots[name].resize(n)

    @contextmanager
    def _using(self, name: str, ctl: JobControl):
        """Hold a slot of stage `name` and report the call's outcome to its circuit breaker."""
        sem = self.slots[name]
        while not sem.acquire(timeout=0.2):
            ctl.check()
        breaker = self.ds.breakers[name]
        try:
            breaker.before_call()
            METRICS.breaker_open.labels(service=name).set(0)
            yield
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE and getattr(err, "stage", name) == name:
                breaker.failure()
                METRICS.breaker_open.labels(service=name).set(breaker.state == "open")
            raise
        except Unavailable as err:
            if err.reason == "CIRCUIT_OPEN":
                METRICS.breaker_open.labels(service=name).set(1)
            raise
        else:
            breaker.success()
        finally:
            sem.release()

    def run(self, job_id: str, object_key: str, plan: Plan, ctl: JobControl) -> Outcome:
        secs: dict[str, float] = {}
        try:
            return self._run(job_id, object_key, plan, ctl, secs)
        except grpc.FutureCancelledError:  # a tracked call's future, cancelled by the job's control
            if ctl.cancelled.is_set():
                raise Cancelled("cancelled") from None
            raise Unavailable(ctl.stalled or "a downstream call was cancelled") from None
        except grpc.RpcError as err:
            if ctl.cancelled.is_set():
                raise Cancelled("cancelled") from None
            if ctl.stalled:
                raise Unavailable(ctl.stalled) from None
            stage = getattr(err, "stage", "")
            if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INTERNAL,
                              grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED):  # fmt: skip
                # the gateway validated the request; a downstream refusing what the gateway sent is
                # the mesh's fault, not the user's
                raise VideomeshError(
                    f"internal error: the {stage or 'downstream'} service refused the gateway's request "
                    f"({err.code().name}: {err.details()})",
                    reason="DOWNSTREAM_REJECTED",
                ) from None
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"deadline exceeded in a downstream call: {err.details()}") from None
            if err.code() == grpc.StatusCode.CANCELLED:  # e.g. a downstream stopping mid-call
                raise Unavailable(f"a downstream call was cancelled: {err.details()}") from None
            if (
                err.code() == grpc.StatusCode.UNAVAILABLE
                and stage in self.ds.addresses
                and self.ds.starting(stage)
            ):
                # the channel sends nothing to a replica whose health is not SERVING, so a service still
                # loading its model fails the call at once; that is not the job's failure (as NOT_READY)
                raise Unavailable(f"the {stage} service is starting or draining (no replica SERVING)",
                                  retry_after=2.0, reason="NOT_READY") from None  # fmt: skip
            raise from_rpc_error(err) from None

    def _run(self, job_id: str, object_key: str, plan: Plan, ctl: JobControl, secs: dict) -> Outcome:
        # 1. text
        t0 = time.perf_counter()
        ctl.check()
        ctl.stage(common_pb2.STAGE_TEXT_ENCODING)
        enc_call = self.ds.encoder.Encode.future(
            encoder_pb2.EncodeRequest(texts=[plan.prompt, plan.negative]),
            timeout=ctl.remaining(self.encode_timeout),
        )
        ctl.track(enc_call)
        try:
            enc = enc_call.result()
        except grpc.RpcError as err:
            err.stage = "encoder"
            raise
        ctl.touch()
        for note in enc.notes:
            message = note.message
            if note.index == 1:  # the encoder numbers texts; the user knows this one as the negative prompt
                message = message.replace("the prompt", "the negative prompt", 1)
            ctl.warn(note.reason, message)
        # split prompt / negative by slicing the bytes: bf16 states stay bf16 (decoding would widen them)
        emb = codec.split_rows(enc.embeddings, name="embeddings")
        mask = codec.split_rows(enc.mask, name="mask")
        if len(emb) != 2 or len(mask) != 2:
            raise RuntimeError(f"encoder returned {len(emb)} states for 2 texts")
        secs["encode"] = time.perf_counter() - t0

        # 2. denoise
        t0 = time.perf_counter()
        ctl.check()
        ctl.stage(common_pb2.STAGE_DENOISING)
        req = denoiser_pb2.DenoiseRequest(
            request_id=job_id,
            text_embeddings=emb[0],
            text_mask=mask[0],
            negative_embeddings=emb[1],
            negative_mask=mask[1],
            num_frames=plan.base_frames,
            height=plan.base_height,
            width=plan.base_width,
            seed=plan.seed,
            num_steps=plan.steps,
            guidance_scale=plan.guidance,
            guidance_scale_2=plan.guidance_2,
            encoder_model=enc.model,
            adapter=plan.adapter,
            adapter_strength=plan.adapter_strength,
            step_cache=plan.step_cache,
        )
        call = self.ds.denoiser.Denoise(req, timeout=ctl.remaining())
        ctl.track(call)
        asm = codec.FrameAssembler(field="denoiser.frames")
        base: list[np.ndarray] = []
        lo, hi = PROGRESS[common_pb2.STAGE_DENOISING]
        for ev in _tagged(call, "denoiser"):
            ctl.touch()
            kind = ev.WhichOneof("event")
            if kind == "progress":
                p = ev.progress
                ctl.report(
                    common_pb2.STAGE_DENOISING, p.step, p.total, lo + (hi - lo) * p.step / max(1, p.total)
                )
            elif kind == "frames":
                base.extend(asm.add(ev.frames))
        ctl.check()
        if len(base) != plan.base_frames:
            raise RuntimeError(f"denoiser returned {len(base)} frames, expected {plan.base_frames}")
        secs["denoise"] = time.perf_counter() - t0

        # 3. upscale, with QC and MP4 encoding fed frame by frame
        t0 = time.perf_counter()
        ctl.stage(common_pb2.STAGE_UPSCALING)
        base_arr = np.stack(base)
        up_requests = [
            upscaler_pb2.UpscaleRequest(
                settings=upscaler_pb2.UpscaleSettings(
                    input_frames=plan.base_frames,
                    input_fps=plan.base_fps,
                    output_width=plan.width,
                    output_height=plan.height,
                    output_frames=plan.frames,
                    output_fps=plan.fps,
                )
            ),
            *(upscaler_pb2.UpscaleRequest(frames=c) for c in codec.frame_chunks(base_arr)),
        ]
        with self._using("upscaler", ctl), self._using("qc", ctl):
            stored, report = self._upscale_check_store(job_id, object_key, plan, up_requests, ctl, secs, t0)
        result = gateway_pb2.VideoResult(
            uri=stored.uri,
            url=stored.url,
            sha256=stored.sha256,
            md5=stored.md5,
            size_bytes=stored.size,
            width=plan.width,
            height=plan.height,
            num_frames=plan.frames,
            fps=plan.fps,
            duration_seconds=plan.frames / plan.fps,
            content_type="video/mp4",
        )
        return Outcome(result=result, quality=report, seconds=secs)

    def _upscale_check_store(
        self, job_id, object_key, plan: Plan, up_requests, ctl: JobControl, secs: dict, t0: float
    ):
        """Upscaled frames go to ffmpeg and to the streaming QC call as they arrive; then store."""
        up_call = self.ds.upscaler.Upscale(iter(up_requests), timeout=ctl.remaining())
        ctl.track(up_call)
        qc_q: queue.Queue = queue.Queue()  # unbounded: at most one clip's chunks, and put() never blocks
        end = object()

        def qc_requests():
            yield qc_pb2.InspectRequest(
                settings=qc_pb2.InspectSettings(
                    fps=plan.fps, expect_motion=plan.expect_motion, total_frames=plan.frames
                )
            )
            while (item := qc_q.get()) is not end:
                yield qc_pb2.InspectRequest(frames=item)

        qc_future = self.ds.qc.Inspect.future(qc_requests(), timeout=ctl.remaining())
        ctl.track(qc_future)
        tmp = Path(tempfile.mkstemp(suffix=".mp4", dir=self.work_dir)[1])
        writer = Mp4Writer(tmp, width=plan.width, height=plan.height, fps=plan.fps)
        try:
            asm = codec.FrameAssembler(field="upscaler.frames")
            pending: list[np.ndarray] = []
            n_out = 0
            lo, hi = PROGRESS[common_pb2.STAGE_UPSCALING]
            try:
                for chunk in _tagged(up_call, "upscaler"):
                    ctl.touch()
                    for frame in asm.add(chunk):
                        if plan.visible_mark:
                            frame = self.visible.apply(frame)
                        if plan.watermark:
                            frame = self.invisible.embed(frame, plan.watermark)
                        writer.write(frame)
                        pending.append(frame)
                        n_out += 1
                        if len(pending) == QC_FRAMES_PER_CHUNK:
                            # every chunk of the group: a 512x512 frame fills a chunk on its own
                            for c in codec.frame_chunks(np.stack(pending), start=n_out - len(pending)):
                                qc_q.put(c)
                            pending = []
                    ctl.report(
                        common_pb2.STAGE_UPSCALING, n_out, plan.frames, lo + (hi - lo) * n_out / plan.frames
                    )
                if pending:
                    for c in codec.frame_chunks(np.stack(pending), start=n_out - len(pending)):
                        qc_q.put(c)
            finally:
                qc_q.put(end)
            if n_out != plan.frames:
                raise RuntimeError(f"upscaler returned {n_out} frames, expected {plan.frames}")
            secs["upscale"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            ctl.stage(common_pb2.STAGE_QUALITY_CHECK)
            try:
                report = qc_future.result(timeout=ctl.remaining())
            except grpc.FutureTimeoutError:
                raise DeadlineExceeded("the quality check did not answer within the job's deadline") from None
            except grpc.RpcError as err:
                err.stage = "qc"
                raise
            secs["qc"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            ctl.stage(common_pb2.STAGE_MUXING)
            writer.close()
            secs["mux"] = time.perf_counter() - t0
            ctl.check()
            if plan.watermark:  # the payload must survive the encoder: re-read it from the file itself
                t0 = time.perf_counter()
                report.checks.append(self._watermark_check(tmp, plan.watermark))
                report.passed = all(c.passed for c in report.checks)
                secs["watermark_check"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            ctl.stage(common_pb2.STAGE_STORING)
            stored = self.storage.put_file(object_key, tmp, metadata={"video-id": job_id})
            secs["store"] = time.perf_counter() - t0
            return stored, report
        except BaseException:
            writer.abort()
            qc_future.cancel()
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _watermark_check(self, path: Path, payload: str) -> common_pb2.CheckResult:
        from gateway.media import iter_frames

        got, confidence, crc_ok = self.invisible.extract(iter_frames(path))
        ok = crc_ok and got == payload
        return common_pb2.CheckResult(
            name="watermark", score=confidence, passed=ok,
            detail=f"payload {got} {'matches' if ok else 'does not match ' + payload} after H.264 (confidence {confidence:.2f})",
        )  # fmt: skip


def _tagged(call, stage: str):
    """Iterate a streaming call; an RpcError it raises is marked with the stage it came from."""
    try:
        yield from call
    except grpc.RpcError as err:
        err.stage = stage
        raise
