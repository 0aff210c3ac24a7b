"""The gateway's domain object: validate and accept jobs, schedule them, run the pipeline,
record every state change as an event. The gRPC servicer is a thin layer over this.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.jobs import TERMINAL, Job, JobStore, MemoryJobStore, new_id, now_ts
from gateway.pipeline import Downstreams, JobControl, Pipeline, Plan
from gateway.storage import LocalStorage, Storage
from services.encoder.model import MAX_PROMPT_CHARS
from videomesh.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    VideomeshError,
)
from videomesh.v1 import common_pb2, denoiser_pb2, gateway_pb2

log = logging.getLogger("videomesh.gateway")

MOTION_WORDS = (
    "move", "moving", "moves", "roll", "slide", "drift", "travel", "head", "go", "bounce", "grow", "shrink", "jog",
    "run", "walk", "fly", "动", "移", "滚", "飞", "跑", "走", "動", "移", "転", "走", "飛",
)  # fmt: skip
STILL_WORDS = ("still", "static", "motionless", "not move", "静止", "不动", "不動", "止ま")


@dataclass(frozen=True)
class GatewaySettings:
    encoder: str = "127.0.0.1:50051"
    denoiser: str = "127.0.0.1:50052"
    upscaler: str = "127.0.0.1:50053"
    qc: str = "127.0.0.1:50054"
    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path = Path("videomesh-data")
    workers: int = 1  # jobs running at once (the CPU default model runs one at a time)
    queue_size: int = 64
    sizes: tuple[str, ...] = ("256x256", "128x128", "512x512")
    default_size: str = "256x256"
    fps_choices: tuple[float, ...] = (24.0, 12.0, 8.0)
    default_fps: float = 24.0
    qc_policy: str = "review"  # review: failed QC -> NEEDS_REVIEW; off: do not gate
    retries: int = 4
    job_timeout: float = 900.0  # upper bound on one job's wall time

    def validate(self) -> None:
        for s in self.sizes:
            w, _, h = s.partition("x")
            if not (w.isdigit() and h.isdigit()) or int(w) % 2 or int(h) % 2:
                raise ValueError(f"sizes: {s!r} must be WIDTHxHEIGHT with even sides")
        if self.default_size not in self.sizes:
            raise ValueError(f"default_size {self.default_size!r} is not in sizes {self.sizes}")
        if self.default_fps not in self.fps_choices:
            raise ValueError(f"default_fps {self.default_fps} is not in fps_choices {self.fps_choices}")
        if self.qc_policy not in ("review", "off"):
            raise ValueError(f"qc_policy must be review or off; got {self.qc_policy!r}")
        if self.workers < 1 or self.queue_size < 1:
            raise ValueError("workers and queue_size must be at least 1")


def _size(s: str) -> tuple[int, int]:
    w, _, h = s.partition("x")
    return int(w), int(h)


def expects_motion(prompt: str) -> bool:
    p = prompt.lower()
    if any(w in p for w in STILL_WORDS):
        return False
    return any(w in p for w in MOTION_WORDS)


@dataclass(order=True)
class _Queued:
    priority: int
    seq: int
    job_id: str = field(compare=False)


class VideoGateway:
    def __init__(
        self, settings: GatewaySettings, *, store: JobStore | None = None, storage: Storage | None = None
    ):
        self.settings = settings
        self.store = store or MemoryJobStore()
        data = Path(settings.data_dir)
        self.storage = storage or LocalStorage(data / "videos")
        self.downstreams = Downstreams(
            settings.encoder, settings.denoiser, settings.upscaler, settings.qc, settings.retries
        )
        self.pipeline = Pipeline(self.downstreams, self.storage, data / "work")
        self.model: denoiser_pb2.ModelInfo | None = None
        self._heap: list[_Queued] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._controls: dict[str, JobControl] = {}
        self._stopping = False
        self._workers: list[threading.Thread] = []

    # --- lifecycle ----------------------------------------------------------------------------
    def load(self, timeout: float = 120.0) -> None:
        """Wait for the denoiser and learn what it supports; start the workers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.model = self.downstreams.denoiser.GetModelInfo(
                    denoiser_pb2.GetModelInfoRequest(), timeout=5, wait_for_ready=True
                )
                break
            except grpc.RpcError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"denoiser at {self.settings.denoiser} not reachable: {err.details()}"
                    ) from err
                time.sleep(0.5)
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._worker, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for ctl in list(self._controls.values()):
            ctl.cancel()
        for t in self._workers:
            t.join(timeout=10)
        self.downstreams.close()

    # --- spec ---------------------------------------------------------------------------------
    def normalize(self, spec: common_pb2.VideoSpec) -> common_pb2.VideoSpec:
        """Validate a user spec and fill defaults. Errors name the field and the allowed values."""
        m = self.model
        assert m is not None, "gateway not loaded"
        s = self.settings
        out = common_pb2.VideoSpec()
        out.CopyFrom(spec)
        violations = []
        prompt = spec.prompt.strip()
        if not prompt:
            violations.append(("spec.prompt", "prompt is empty; describe the video you want"))
        elif len(spec.prompt) > MAX_PROMPT_CHARS:
            violations.append(
                ("spec.prompt", f"prompt has {len(spec.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
            )
        if len(spec.negative_prompt) > MAX_PROMPT_CHARS:
            violations.append(
                ("spec.negative_prompt", f"negative prompt longer than {MAX_PROMPT_CHARS} characters")
            )
        if len(spec.style) > 100:
            violations.append(("spec.style", "style is longer than 100 characters"))
        if spec.width < 0 or spec.height < 0:
            violations.append(("spec.width", f"size must be positive; got {spec.width}x{spec.height}"))
        elif spec.width or spec.height:
            if f"{spec.width}x{spec.height}" not in s.sizes:
                violations.append(
                    (
                        "spec.width",
                        f"size {spec.width}x{spec.height} is not offered; choose one of {', '.join(s.sizes)}",
                    )
                )
        else:
            out.width, out.height = _size(s.default_size)
        if spec.fps < 0 or not math.isfinite(spec.fps):
            violations.append(("spec.fps", f"fps must be positive; got {spec.fps}"))
        elif spec.fps and spec.fps not in s.fps_choices:
            violations.append(
                (
                    "spec.fps",
                    f"fps {spec.fps:g} is not offered; choose one of {', '.join(f'{f:g}' for f in s.fps_choices)}",
                )
            )
        elif not spec.fps:
            out.fps = s.default_fps
        model_duration = m.frame_counts[0] / m.fps
        if spec.duration_seconds < 0 or not math.isfinite(spec.duration_seconds):
            violations.append(
                ("spec.duration_seconds", f"duration must be positive; got {spec.duration_seconds}")
            )
        elif spec.duration_seconds and abs(spec.duration_seconds - model_duration) > 1e-3:
            allowed = ", ".join(f"{c / m.fps:g}" for c in m.frame_counts)
            violations.append(
                (
                    "spec.duration_seconds",
                    f"duration {spec.duration_seconds:g}s is not offered by model {m.name}; allowed: {allowed} s",
                )
            )
        else:
            out.duration_seconds = model_duration
        if spec.num_steps < 0 or spec.num_steps > m.max_steps:
            violations.append(
                (
                    "spec.num_steps",
                    f"num_steps must be in 1..{m.max_steps} (0 = default {m.default_steps}); got {spec.num_steps}",
                )
            )
        elif not spec.num_steps:
            out.num_steps = m.default_steps
        if not (0 <= spec.guidance_scale <= 30) or not math.isfinite(spec.guidance_scale):
            violations.append(
                (
                    "spec.guidance_scale",
                    f"guidance_scale must be in 0..30 (0 = default); got {spec.guidance_scale}",
                )
            )
        if spec.language and spec.language not in m.languages:
            violations.append(
                (
                    "spec.language",
                    f"language {spec.language!r} is not supported; choose one of {', '.join(m.languages)}",
                )
            )
        if violations:
            raise InvalidArgument("; ".join(d for _, d in violations), violations=violations)
        if not spec.HasField("seed"):
            out.seed = random.randrange(1, 2**31)
        out.prompt = prompt
        return out

    def plan(self, spec: common_pb2.VideoSpec) -> Plan:
        m = self.model
        prompt = spec.prompt + (f", {spec.style}" if spec.style else "")
        return Plan(
            prompt=prompt,
            negative=spec.negative_prompt,
            base_frames=m.frame_counts[0],
            base_width=m.sizes[0].width,
            base_height=m.sizes[0].height,
            base_fps=m.fps,
            width=spec.width,
            height=spec.height,
            fps=spec.fps,
            frames=int(round(spec.duration_seconds * spec.fps)),
            seed=spec.seed,
            steps=spec.num_steps,
            guidance=spec.guidance_scale,
            encoder_model=m.encoder_model,
            expect_motion=expects_motion(spec.prompt),
        )

    # --- public operations ----------------------------------------------------------------------
    def create(self, tenant: str, spec: common_pb2.VideoSpec, request_id: str = "", *, tier: str = "free",
               regenerated_from: str = "") -> gateway_pb2.Video:  # fmt: skip
        norm = self.normalize(spec)
        video = gateway_pb2.Video(
            id=new_id(),
            status=common_pb2.QUEUED,
            stage=common_pb2.STAGE_QUEUED,
            spec=norm,
            create_time=now_ts(),
            update_time=now_ts(),
            regenerated_from=regenerated_from,
            model=f"{self.model.name}@{self.model.version}",
        )
        job = Job(id=video.id, tenant=tenant, video=video, request_id=request_id, tier=tier)
        with self._cv:
            if len(self._heap) >= self.settings.queue_size:
                raise ResourceExhausted(
                    f"the queue is full ({self.settings.queue_size} jobs); retry later",
                    retry_after=5.0,
                    reason="QUEUE_FULL",
                )
            stored = self.store.create(job)
            if stored is not job:  # idempotent replay of the same request id
                return self.get(tenant, stored.id)
            heapq.heappush(self._heap, _Queued(self._priority(tier), next(self._seq), job.id))
            position = len(self._heap)
            self.store.update(job.id, lambda v: setattr(v, "queue_position", position))
            self.store.append_event(
                job.id, gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=position))
            )
            self._cv.notify()
        return self.get(tenant, job.id)

    @staticmethod
    def _priority(tier: str) -> int:
        return 0 if tier in ("pro", "enterprise") else 10

    def get(self, tenant: str, video_id: str) -> gateway_pb2.Video:
        return self.store.snapshot(self.store.get(tenant, video_id).id)

    def list(self, tenant: str, *, page_size: int = 20, page_token: str = "", status: int = 0):
        if page_size < 0 or page_size > 100:
            raise InvalidArgument("page_size must be in 0..100", field="page_size")
        size = page_size or 20
        try:
            offset = int(page_token or 0)
        except ValueError:
            raise InvalidArgument("page_token is not one this server issued", field="page_token") from None
        jobs = self.store.list(tenant, status=status, limit=size + 1, offset=offset)
        nxt = str(offset + size) if len(jobs) > size else ""
        return [self.store.snapshot(j.id) for j in jobs[:size]], nxt

    def cancel(self, tenant: str, video_id: str) -> gateway_pb2.Video:
        job = self.store.get(tenant, video_id)
        with self._cv:
            status = job.video.status
            if status in TERMINAL or status == common_pb2.NEEDS_REVIEW:
                raise FailedPrecondition(
                    f"video {video_id} is already {common_pb2.VideoStatus.Name(status)}; only queued or running jobs can be cancelled"
                )
            removed = False
            for i, q in enumerate(self._heap):
                if q.job_id == video_id:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    removed = True
                    break
            if removed:
                self._finish_cancelled(video_id, "cancelled while queued")
            elif video_id in self._controls:
                self._controls[video_id].cancel()
        if not removed:
            self.wait_terminal(tenant, video_id, timeout=30)
        return self.get(tenant, video_id)

    def cancel_quietly(self, video_id: str, reason: str) -> None:
        """Cancel from inside the server (a GenerateVideo stream that ended early)."""
        with self._cv:
            for i, q in enumerate(self._heap):
                if q.job_id == video_id:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    self._finish_cancelled(video_id, reason)
                    return
            ctl = self._controls.get(video_id)
        if ctl:
            ctl.cancel()

    def wait_terminal(self, tenant: str, video_id: str, timeout: float) -> gateway_pb2.Video:
        after = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.store.wait_events(video_id, after, timeout=min(1.0, deadline - time.monotonic())):
                after = ev.sequence
                if ev.WhichOneof("event") in ("completed", "failed", "cancelled"):
                    return self.get(tenant, video_id)
        return self.get(tenant, video_id)

    def regenerate(
        self, tenant: str, video_id: str, seed: int | None, request_id: str, tier: str
    ) -> gateway_pb2.Video:
        old = self.store.get(tenant, video_id).video
        spec = common_pb2.VideoSpec()
        spec.CopyFrom(old.spec)
        if seed is None:
            spec.ClearField("seed")
            while True:
                spec.seed = random.randrange(1, 2**31)
                if spec.seed != old.spec.seed:
                    break
        else:
            spec.seed = seed
        return self.create(tenant, spec, request_id, tier=tier, regenerated_from=video_id)

    def events(self, tenant: str, video_id: str, after: int, is_active) -> iter:
        """Yield events after `after` until (and including) the terminal one."""
        self.store.get(tenant, video_id)  # NotFound for other tenants
        while is_active():
            for ev in self.store.wait_events(video_id, after, timeout=0.5):
                after = ev.sequence
                yield ev
                if ev.WhichOneof("event") in ("completed", "failed", "cancelled"):
                    return

    # --- execution --------------------------------------------------------------------------------
    def _finish_cancelled(self, job_id: str, why: str) -> None:
        def mut(v):
            v.status = common_pb2.CANCELLED
            v.error.CopyFrom(
                gateway_pb2.VideoError(
                    code=grpc.StatusCode.CANCELLED.value[0], message=why, reason="CANCELLED"
                )
            )

        self.store.update(job_id, mut)
        self.store.append_event(job_id, gateway_pb2.VideoEvent(cancelled=gateway_pb2.Cancelled()))

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                item = heapq.heappop(self._heap)
                job_id = item.job_id
                ctl = JobControl(
                    report=lambda stage, step, total, pct, _id=job_id: self._progress(
                        _id, stage, step, total, pct
                    ),
                    stage=lambda stage, _id=job_id: self._stage(_id, stage),
                    deadline=time.monotonic() + self.settings.job_timeout,
                )
                self._controls[job_id] = ctl
                self._positions_changed()
            try:
                self._execute(job_id, ctl)
            except Exception:  # noqa: BLE001 - a worker must never die
                log.exception("job %s crashed the worker loop", job_id)
            finally:
                with self._cv:
                    self._controls.pop(job_id, None)

    def _positions_changed(self) -> None:
        for pos, q in enumerate(sorted(self._heap), start=1):
            self.store.update(q.job_id, lambda v, p=pos: setattr(v, "queue_position", p))

    def _stage(self, job_id: str, stage: int) -> None:
        def mut(v):
            v.stage = stage
            lo = _progress_lo(stage)
            v.progress = max(v.progress, lo)

        self.store.update(job_id, mut)
        self.store.append_event(
            job_id, gateway_pb2.VideoEvent(stage_started=gateway_pb2.StageStarted(stage=stage))
        )

    def _progress(self, job_id: str, stage: int, step: int, total: int, pct: float) -> None:
        self.store.update(job_id, lambda v: setattr(v, "progress", max(v.progress, pct)))
        self.store.append_event(
            job_id,
            gateway_pb2.VideoEvent(
                progress=gateway_pb2.Progress(stage=stage, step=step, total=total, percent=pct)
            ),
        )

    def _execute(self, job_id: str, ctl: JobControl) -> None:
        tenant = self.store.load(job_id).tenant
        video = self.store.update(job_id, _start)
        plan = self.plan(video.spec)
        try:
            outcome = self.pipeline.run(job_id, f"{tenant}/{job_id}.mp4", plan, ctl)
        except Cancelled as err:
            if ctl.cancelled.is_set():
                self._finish_cancelled(job_id, "cancelled by request")
            else:
                self._fail(job_id, err)
            return
        except VideomeshError as err:
            self._fail(job_id, err)
            return
        except Exception as err:  # noqa: BLE001
            log.exception("job %s failed", job_id)
            self._fail(job_id, VideomeshError(f"internal error: {type(err).__name__}"))
            return

        review = self.settings.qc_policy == "review" and not outcome.quality.passed

        def done(v):
            v.status = common_pb2.NEEDS_REVIEW if review else common_pb2.SUCCEEDED
            v.stage = common_pb2.STAGE_DONE
            v.progress = 100.0
            v.result.CopyFrom(outcome.result)
            v.quality.CopyFrom(outcome.quality)

        final = self.store.update(job_id, done)
        self.store.append_event(job_id, gateway_pb2.VideoEvent(completed=gateway_pb2.Completed(video=final)))
        log.info(
            "job %s %s in %s",
            job_id,
            common_pb2.VideoStatus.Name(final.status),
            {k: round(v, 2) for k, v in outcome.seconds.items()},
        )

    def _fail(self, job_id: str, err: VideomeshError) -> None:
        code = err.code.value[0] if isinstance(err.code, grpc.StatusCode) else int(err.code)
        if isinstance(err, Unavailable) or err.code == grpc.StatusCode.UNAVAILABLE:
            reason = "DOWNSTREAM_UNAVAILABLE"
        else:
            reason = err.reason

        def mut(v):
            v.status = common_pb2.FAILED
            v.error.CopyFrom(gateway_pb2.VideoError(code=code, message=err.message, reason=reason))

        self.store.update(job_id, mut)
        self.store.append_event(
            job_id,
            gateway_pb2.VideoEvent(
                failed=gateway_pb2.Failed(
                    error=gateway_pb2.VideoError(code=code, message=err.message, reason=reason)
                )
            ),
        )


def _start(v: gateway_pb2.Video) -> None:
    v.status = common_pb2.RUNNING
    v.attempt += 1
    v.queue_position = 0


def _progress_lo(stage: int) -> float:
    from gateway.pipeline import PROGRESS

    return PROGRESS.get(stage, (0.0, 0.0))[0]
