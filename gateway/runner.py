"""The runner: the gateway's workers. Claim a job, run its attempts through the pipeline, regenerate on a
failed quality gate, retry what is retryable, and make the one terminal transition.

Every write of a worker carries a `Fence` (gateway.jobs): the lease owner (PostgreSQL replicas) and the
attempt. A worker whose lease was taken over, or whose attempt was re-queued or cancelled, writes
nothing more: the store refuses it. Storing the file comes after the STORING stage write, which is
fenced, so an attempt that lost its job does not upload either.

With a leased queue (several replicas), a lease thread renews this replica's leases, re-queues jobs
whose lease expired (a replica died), and stops a local attempt whose job was cancelled on another
replica. With the in-process queue (one gateway), jobs left RUNNING by a crash re-run after restart.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import grpc

from gateway.jobs import Fence, Fenced, Job, JobStore, requeued
from gateway.metrics import METRICS
from gateway.pipeline import PROGRESS, JobControl
from videomesh import tracing
from videomesh.errors import Cancelled, NotFound, Unavailable, VideomeshError
from videomesh.logs import job_context
from videomesh.v1 import common_pb2, gateway_pb2

log = logging.getLogger("videomesh.gateway")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class NotCancellable(Exception):
    """Raised inside a store transaction (rolled back): the job is no longer queued or running."""


class JobRunner:
    def __init__(self, gw):  # gateway.gateway.VideoGateway: settings, store, queue, spec, cache, webhooks
        self.gw = gw
        self.settings = gw.settings
        self.store: JobStore = gw.store
        self.queue = gw.queue
        self.controls: dict[str, JobControl] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.draining = threading.Event()  # SIGTERM: claim nothing more; jobs in flight may finish
        self.threads: list[threading.Thread | None] = []  # by worker index; None: stopped by resize
        self.workers = 0
        self._not_ready_since: dict[str, float] = {}  # job -> when a downstream first answered NOT_READY

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self, workers: int) -> None:
        self.workers = workers
        if self.queue.leased:  # the queue is the database's: nothing to rebuild, leases to keep
            threading.Thread(target=self._leases, name="leases", daemon=True).start()
            self.gw.recovered.set()
        else:  # jobs from before a restart resume once every downstream is SERVING (see _recover_when_ready)
            leftover = [j.id for j in self.store.by_status(common_pb2.QUEUED, common_pb2.RUNNING)]
            threading.Thread(
                target=self._recover_when_ready, args=(leftover,), name="recover", daemon=True
            ).start()
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        self.resize(workers)

    def resize(self, workers: int) -> None:
        """Run `workers` job workers: more start now; a worker beyond the number stops once its job is done."""
        with self.lock:
            self.workers = workers
            for i in range(workers):
                if i < len(self.threads) and self.threads[i] is not None and self.threads[i].is_alive():
                    continue
                t = threading.Thread(target=self._worker, args=(i,), name=f"job-worker-{i}", daemon=True)
                if i < len(self.threads):
                    self.threads[i] = t
                else:
                    self.threads.append(t)
                t.start()

    def drain(self, grace: float) -> list[str]:
        """Stop claiming jobs and give those in flight up to `grace` seconds to finish; -> the ids still
        running then (close() stops them: handed back to the other replicas, or re-run after a restart)."""
        with self.lock:
            self.draining.set()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self.lock:
                if not self.controls:
                    return []
            time.sleep(0.1)
        with self.lock:
            return sorted(self.controls)

    def close(self) -> None:
        self.draining.set()
        self.stopping.set()
        self.queue.close()
        with self.lock:
            controls = list(self.controls.values())
        for ctl in controls:  # stop work in flight: handed back (leased queue) or re-run on restart
            ctl.shutdown()
        for t in list(self.threads):
            if t is not None:
                t.join(timeout=10)

    def _recover_when_ready(self, job_ids: list[str]) -> None:
        # a service still loading its model would otherwise fail their first attempt
        waiting = set()
        while not self.stopping.is_set():
            down = self.gw.downstreams.not_serving()
            if not down:
                break
            if set(down) != waiting:
                waiting = set(down)
                log.info("recovery waits for %s to be SERVING", ", ".join(down))
            self.stopping.wait(0.5)
        else:
            return
        self.recover(job_ids)
        self.gw.recovered.set()

    def recover(self, job_ids: list[str]) -> None:
        """Queued jobs are queued again; jobs that were running when the gateway stopped re-run.
        A job cancelled meanwhile stays cancelled (the requeue is refused inside its transaction)."""
        for job_id in job_ids:
            job = self.store.load(job_id)
            if job.video.status == common_pb2.RUNNING:
                log.warning(
                    "job %s was running at shutdown (attempt %d): re-running", job.id, job.video.attempt
                )
                if not self.requeue(job.id):
                    continue
            elif job.video.status != common_pb2.QUEUED:
                continue
            policy = self.gw.policy(job.tier)
            pos = self.queue.push(job.id, job.tenant, policy.priority, policy.max_running, force=True)
            if job.video.status == common_pb2.RUNNING:
                self.store.append_event(
                    job.id, gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=pos))
                )

    def _leases(self) -> None:
        """Renew this replica's leases, follow cancellations made elsewhere, re-queue expired leases."""
        every = max(0.1, min(0.5, self.queue.lease / 4))
        last_reap = 0.0
        while not self.stopping.wait(every):
            try:
                with self.lock:
                    controls = dict(self.controls)
                lost, statuses = self.queue.renew(list(controls))
                for job_id, ctl in controls.items():
                    if job_id in lost and not ctl.cancelled.is_set():
                        log.warning(
                            "job %s: this replica's lease was taken over; stopping the attempt", job_id
                        )
                        ctl.lose_lease()
                    elif statuses.get(job_id) == common_pb2.CANCELLED and not ctl.cancelled.is_set():
                        log.info("job %s was cancelled on another replica: stopping its attempt", job_id)
                        ctl.cancel("cancelled by request")
                if time.monotonic() - last_reap >= min(1.0, self.queue.lease / 2):
                    last_reap = time.monotonic()
                    self.queue.reap()
            except VideomeshError as err:  # the database is away: the leases run out if it stays away
                log.warning("leases: %s", err.message)
            except Exception:  # noqa: BLE001 - this thread must not die
                log.exception("lease thread")

    def _watchdog(self) -> None:
        """Stop attempts whose downstream went silent (no message for stall_timeout): their calls are
        cancelled and the attempt fails UNAVAILABLE, so it is retried instead of holding a worker."""
        limit = self.settings.stall_timeout
        while not self.stopping.wait(min(1.0, limit / 4)):
            now = time.monotonic()
            with self.lock:
                controls = list(self.controls.items())
            for job_id, ctl in controls:
                idle = now - ctl.last_activity
                if idle > limit and not ctl.stalled and not ctl.cancelled.is_set():
                    log.warning(
                        "job %s: no word from downstream for %.0f s; stopping the attempt", job_id, idle
                    )
                    ctl.stall(
                        f"a downstream service sent nothing for {idle:.0f} s (stall_timeout {limit:g} s)"
                    )

    def wedged(self) -> bool:
        """Every worker holds a job that has been silent for twice the stall timeout (the watchdog could
        not free it): the gateway takes no work, so its health must say so."""
        now = time.monotonic()
        with self.lock:
            idle = [now - c.last_activity for c in self.controls.values()]
        return len(idle) >= max(1, self.workers) and min(idle) > 2 * self.settings.stall_timeout

    def cancel_local(self, job_id: str, why: str) -> None:
        with self.lock:
            ctl = self.controls.get(job_id)
        if ctl:
            ctl.cancel(why)

    # --- the worker loop ----------------------------------------------------------------------------------
    def _worker(self, index: int) -> None:
        while not self.stopping.is_set():
            with self.lock:
                if index >= self.workers:  # resized down: this one is no longer wanted
                    self.threads[index] = None
                    return
            if self.draining.is_set():
                self.stopping.wait(0.2)
                continue
            try:
                entry = self.queue.pop(timeout=0.5)
            except VideomeshError as err:
                log.warning("queue: %s", err.message)
                self.stopping.wait(1.0)
                continue
            if entry is None:
                continue
            METRICS.queue_wait.observe(entry.waited)
            try:
                METRICS.queue_depth.set(len(self.queue))
            except VideomeshError:
                pass
            self._run(entry)

    def _run(self, entry) -> None:
        """One claimed job: its control (with this attempt's fence in every callback), then release."""
        jid = entry.job_id
        ctl = JobControl(report=lambda *a: None, stage=lambda s: None,
                         deadline=time.monotonic() + self.settings.job_timeout)  # fmt: skip
        ctl.fence = Fence(entry.owner)
        ctl.report = lambda stage, step, total, pct: self._progress(jid, stage, step, total, pct, ctl.fence)
        ctl.stage = lambda stage: self._stage(jid, stage, ctl.fence)
        ctl.warn = lambda reason, message: self._warn(jid, reason, message, ctl.fence)
        # the same lock drain() sets `draining` under: a claim is either seen by it or not run
        with self.lock:
            draining = self.draining.is_set()
            if not draining:
                self.controls[jid] = ctl
        if draining:  # claimed as the drain began: not started, so handed straight back
            try:
                self.queue.done(jid, entry.tenant)
            except VideomeshError as err:
                log.warning("job %s: could not hand back its claim: %s", jid, err.message)
            return
        try:
            self._execute(jid, ctl)
        except Exception:  # noqa: BLE001 - a worker must never die
            log.exception("job %s crashed the worker loop", jid)
        finally:
            with self.lock:
                self.controls.pop(jid, None)
            try:
                self.queue.done(jid, entry.tenant)
            except VideomeshError as err:  # the lease runs out and another attempt follows
                log.warning("job %s: could not release its claim: %s", jid, err.message)

    def _warn(self, job_id: str, reason: str, message: str, fence: Fence | None = None) -> None:
        """A Warning event and Video.warnings (once per reason)."""
        added = []

        def mut(v):
            if message not in v.warnings:
                v.warnings.append(message)
                added.append(True)

        self.store.update(job_id, mut, fence=fence)
        if added:
            self.store.append_event(
                job_id,
                gateway_pb2.VideoEvent(warning=gateway_pb2.Warning(reason=reason, message=message)),
                fence=fence,
            )

    def _stage(self, job_id: str, stage: int, fence: Fence | None = None) -> None:
        """Fenced: an attempt that lost its job stops here (before STORING, it uploads nothing)."""

        def mut(v):
            v.stage = stage
            v.progress = max(v.progress, PROGRESS.get(stage, (0.0, 0.0))[0])

        self.store.update(job_id, mut, fence=fence)
        self.store.append_event(job_id, gateway_pb2.VideoEvent(stage_started=gateway_pb2.StageStarted(stage=stage)),
                                fence=fence)  # fmt: skip

    def _progress(
        self, job_id: str, stage: int, step: int, total: int, pct: float, fence: Fence | None = None
    ) -> None:
        try:
            self.store.update(job_id, lambda v: setattr(v, "progress", max(v.progress, pct)), fence=fence)
        except Fenced:
            raise
        except VideomeshError as err:  # a progress report is not worth an attempt: drop it
            log.debug("job %s: progress not recorded: %s", job_id, err.message)
            return
        self.store.append_event(
            job_id,
            gateway_pb2.VideoEvent(
                progress=gateway_pb2.Progress(stage=stage, step=step, total=total, percent=pct)
            ),
            fence=fence,
        )

    def _execute(self, job_id: str, ctl: JobControl) -> None:
        job = self.store.load(job_id)
        if job.video.status != common_pb2.QUEUED:  # cancelled between pop and start
            return
        try:
            video = self.store.update(job_id, _start, fence=ctl.fence)
        except (
            NotCancellable,
            Fenced,
        ):  # cancelled, or taken by another worker, between the check and the start
            return
        ctl.fence = Fence(ctl.fence.owner, video.attempt)
        # the attempt is a span of the creating request's trace: its calls through the mesh carry it
        with tracing.job_span("job.attempt", video.trace_parent, **{"videomesh.job": job_id,
                              "videomesh.attempt": video.attempt, "videomesh.tenant": job.tenant}), \
                job_context(job_id, job.tenant):  # fmt: skip
            log.info("job %s attempt %d started%s%s", job_id, video.attempt,
                     f" on replica {ctl.fence.owner}" if ctl.fence.owner else "",
                     f" (trace {video.trace_id})" if video.trace_id else "")  # fmt: skip
            self._attempt(job, video, ctl)

    def _attempt(self, job: Job, video: gateway_pb2.Video, ctl: JobControl) -> None:
        job_id = job.id
        pipeline = self.gw.pipeline
        key = f"{job.tenant}/{job_id}.mp4"
        t0 = time.perf_counter()
        try:
            outcome = pipeline.run(job_id, key, self.gw.spec.plan_for(job, video), ctl)
            while (self.settings.qc_policy == "review" and not outcome.quality.passed
                   and video.qc_regenerations < self.settings.qc_regenerations):  # fmt: skip
                failed = ", ".join(c.name for c in outcome.quality.checks if not c.passed)
                log.info("job %s failed QC (%s): regenerating with a new seed", job_id, failed)
                video = self.store.update(job_id, _new_seed, fence=ctl.fence)
                outcome = pipeline.run(job_id, key, self.gw.spec.plan_for(job, video), ctl)
        except Fenced:  # its write was refused: cancelled, or taken over, elsewhere (the stop is at once)
            try:
                status = self.store.snapshot(job_id).status
            except VideomeshError:
                status = 0
            if status == common_pb2.CANCELLED:
                log.info(
                    "job %s was cancelled on another replica: its attempt %d stopped", job_id, video.attempt
                )
            else:
                log.warning("job %s: attempt %d no longer holds the job (now %s); its result is dropped", job_id,
                            video.attempt, common_pb2.VideoStatus.Name(status) if status else "unknown")  # fmt: skip
            return
        except Cancelled:
            if ctl.stopped_for_shutdown or ctl.lease_lost:
                return  # the job is another attempt's now (handed back, re-run after restart, taken over)
            if ctl.cancelled.is_set():
                self.finish_cancelled(job_id, ctl.reason or "cancelled by request")
            else:
                self.fail(job_id, VideomeshError("cancelled by a downstream service"), fence=ctl.fence)
            return
        except VideomeshError as err:
            if ctl.stopped_for_shutdown or ctl.lease_lost:
                return
            self._retry_or_fail(job, video, err, ctl)
            return
        except Exception as err:  # noqa: BLE001
            log.exception("job %s failed", job_id)
            self.fail(job_id, VideomeshError(f"internal error: {type(err).__name__}"), fence=ctl.fence)
            return
        for stage, secs in outcome.seconds.items():
            METRICS.stage_seconds.labels(stage=stage).observe(secs)
        review = self.settings.qc_policy == "review" and not outcome.quality.passed

        def done(v):
            v.status = common_pb2.NEEDS_REVIEW if review else common_pb2.SUCCEEDED
            v.stage = common_pb2.STAGE_DONE
            v.progress = 100.0
            v.result.CopyFrom(outcome.result)
            v.quality.CopyFrom(outcome.quality)
            for stage, secs in outcome.seconds.items():
                v.stage_seconds[stage] = v.stage_seconds.get(stage, 0.0) + secs

        self._not_ready_since.pop(job_id, None)
        final = self.store.finish(job_id, done, gateway_pb2.VideoEvent(completed=gateway_pb2.Completed()),
                                  fence=ctl.fence)  # fmt: skip
        if final is None:
            return
        if final.status == common_pb2.SUCCEEDED:
            self.gw.cache.remember(job, final)
        self.terminal(job, final)
        log.info("job %s %s in %.1fs %s", job_id, common_pb2.VideoStatus.Name(final.status), time.perf_counter() - t0,
                 {k: round(v, 2) for k, v in outcome.seconds.items()})  # fmt: skip

    def _retry_or_fail(
        self, job: Job, video: gateway_pb2.Video, err: VideomeshError, ctl: JobControl
    ) -> None:
        job_id = job.id
        # a downstream still loading its model (a restart: minutes for Wan) is not the job's failure:
        # wait for it without spending attempts, up to model_wait_timeout
        free = err.reason == "DATABASE_UNAVAILABLE"  # our own store's outage is not the job's attempt either
        if err.reason == "NOT_READY":
            first = self._not_ready_since.setdefault(job_id, time.monotonic())
            free = time.monotonic() - first < self.settings.model_wait_timeout
        if err.code in RETRYABLE and (free or video.attempt < self.settings.max_attempts):
            backoff = self.settings.retry_backoff * 2 ** (video.attempt - 1)
            delay = max(err.retry_after or 0.0, 2.0 if free else backoff)
            log.warning("job %s attempt %d: %s; retrying in %.1fs%s", job_id, video.attempt, err.message, delay,
                        " (not counted: the service is still loading)" if free else "")  # fmt: skip
            if not self.requeue(
                job_id, refund=free, fence=ctl.fence
            ):  # cancelled meanwhile: it stays cancelled
                return
            policy = self.gw.policy(job.tier)
            pos = self.queue.push(
                job_id, job.tenant, policy.priority, policy.max_running, delay=delay, force=True
            )
            self.store.append_event(job_id, gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=pos)))
            return
        self._not_ready_since.pop(job_id, None)
        self.fail(job_id, err, fence=ctl.fence)

    # --- transitions ----------------------------------------------------------------------------------------
    def requeue(self, job_id: str, refund: bool = False, fence: Fence | None = None) -> bool:
        """RUNNING -> QUEUED in one transaction; False (and nothing changed) if the job is no longer
        running, e.g. cancelled while its attempt was failing. `refund`: the attempt does not count."""

        def mut(v):
            if v.status != common_pb2.RUNNING:
                raise NotCancellable  # rolls the transaction back: a cancelled job is not revived
            requeued(v)
            if refund:
                v.attempt = max(0, v.attempt - 1)

        try:
            self.store.update(job_id, mut, fence=fence)
        except NotCancellable:
            return False
        except Fenced:
            log.warning("job %s: this attempt no longer holds the job; it is not re-queued by it", job_id)
            return False
        return True

    def finish_cancelled(self, job_id: str, why: str) -> None:
        def mut(v):
            if v.status not in (common_pb2.QUEUED, common_pb2.RUNNING):  # e.g. NEEDS_REVIEW: not ours to end
                raise NotCancellable
            v.status = common_pb2.CANCELLED
            v.error.CopyFrom(
                gateway_pb2.VideoError(
                    code=grpc.StatusCode.CANCELLED.value[0], message=why, reason="CANCELLED"
                )
            )

        try:
            final = self.store.finish(job_id, mut, gateway_pb2.VideoEvent(cancelled=gateway_pb2.Cancelled()))
        except NotCancellable:
            return
        if final is not None:
            self.terminal(self.store.load(job_id), final)

    def fail(self, job_id: str, err: VideomeshError, fence: Fence | None = None) -> None:
        code = err.code.value[0] if isinstance(err.code, grpc.StatusCode) else int(err.code)
        reason = (
            "DOWNSTREAM_UNAVAILABLE"
            if err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "UNAVAILABLE"
            else err.reason
        )
        error = gateway_pb2.VideoError(code=code, message=err.message, reason=reason)

        def mut(v):
            v.status = common_pb2.FAILED
            v.error.CopyFrom(error)

        final = self.store.finish(job_id, mut, gateway_pb2.VideoEvent(failed=gateway_pb2.Failed(error=error)),
                                  fence=fence)  # fmt: skip
        if final is not None:
            self.terminal(self.store.load(job_id), final)
        elif fence is not None and fence.attempt:
            log.warning("job %s: attempt %d no longer holds the job; its failure (%s) is not recorded", job_id,
                        fence.attempt, err.message)  # fmt: skip

    def terminal(self, job: Job, video: gateway_pb2.Video) -> None:
        """Metrics and the webhook, once per job (finish() guarantees the once)."""
        METRICS.jobs.labels(status=common_pb2.VideoStatus.Name(video.status), tier=job.tier).inc()
        url = job.webhook
        secret = ""
        tenants = self.gw.tenants
        if tenants is not None:
            for attempt in range(4):  # the tenants' database may blip: never sign with an empty key for it
                try:
                    t = tenants.get(job.tenant)
                    url = url or t.webhook_url
                    secret = t.webhook_secret
                    break
                except NotFound:
                    break  # the tenant is gone: a job-level URL still hears of its job, unsigned
                except Unavailable as err:
                    if attempt == 3:
                        log.error("job %s: webhook not sent: the tenant directory is unavailable (%s)", job.id,
                                  err.message)  # fmt: skip
                        return
                    self.stopping.wait(0.5 * 2**attempt)
        if url:
            from google.protobuf import json_format

            self.gw.webhooks.send(url, secret, {"type": "video." + common_pb2.VideoStatus.Name(video.status).lower(),
                                                "video": json_format.MessageToDict(video)})  # fmt: skip


def _new_seed(v: gateway_pb2.Video) -> None:
    old = v.spec.seed
    while v.spec.seed == old:
        v.spec.seed = random.randrange(1, 2**31)
    v.qc_regenerations += 1
    v.progress = 0.0


def _start(v: gateway_pb2.Video) -> None:
    if v.status != common_pb2.QUEUED:
        raise NotCancellable  # only one worker moves a job QUEUED -> RUNNING
    v.status = common_pb2.RUNNING
    v.attempt += 1
    v.queue_position = 0
