"""Job records, their event logs, and the JobStore interface.

A job's event log is the source of truth for streams: every event gets the next sequence
number of that job, and `wait_events(id, after)` blocks until there are newer ones, so
WatchVideo can resume after any sequence without losing or repeating events.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from videomesh.errors import VideomeshError
from videomesh.v1 import common_pb2, gateway_pb2

TERMINAL = frozenset({common_pb2.SUCCEEDED, common_pb2.FAILED, common_pb2.CANCELLED})
ENDED = TERMINAL | {common_pb2.NEEDS_REVIEW}  # no event comes after these


def is_postgres(database: str) -> bool:
    """Whether the gateway's `database` setting names PostgreSQL (else it is SQLite: a path, or empty)."""
    return database.startswith(("postgresql://", "postgres://"))


def now_ts(t: float | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() if t is None else t) * 1e9))
    return ts


def new_id() -> str:
    return "vid_" + uuid.uuid4().hex[:20]


@dataclass
class Job:
    id: str
    tenant: str
    video: gateway_pb2.Video
    request_id: str = ""
    tier: str = "free"
    webhook: str = ""  # per-request webhook URL (the tenant's is the fallback)


@dataclass(frozen=True)
class Fence:
    """What a worker's write must still hold to land (fencing): `owner`, the replica whose lease on
    the job must still be current (empty = no lease, one gateway owns the store), and `attempt`, the
    attempt that must still be the job's RUNNING one (0 = not started yet: only the lease counts).
    A replica whose lease expired and was taken over, or an attempt that was re-queued, cancelled or
    superseded, writes nothing more: its updates raise Fenced, its finish returns None, its events
    are dropped."""

    owner: str = ""
    attempt: int = 0

    def holds(self, video: gateway_pb2.Video, lease_owner: str | None = None, claimed: bool = True) -> bool:
        if self.owner and (lease_owner != self.owner or not claimed):
            return False
        return not self.attempt or (video.status == common_pb2.RUNNING and video.attempt == self.attempt)


class Fenced(VideomeshError):
    """A write of an attempt that no longer holds its job (see Fence); the attempt stops quietly."""

    code = grpc.StatusCode.ABORTED
    reason = "LEASE_LOST"


def requeued(v: gateway_pb2.Video) -> None:
    """RUNNING -> QUEUED for a re-run (after a crash, a lost lease or a retryable failure)."""
    v.status = common_pb2.QUEUED
    v.stage = common_pb2.STAGE_QUEUED
    v.progress = 0.0


class JobStore(ABC):
    """Where jobs and their events live. Implementations must be thread-safe."""

    @abstractmethod
    def create(self, job: Job, first_event: gateway_pb2.VideoEvent | None = None,
               enqueue: tuple[int, int] | None = None) -> Job:  # fmt: skip
        """Insert; if (tenant, request_id) exists already, return the existing job instead. The job, its
        `first_event` (sequence 1) and, for a store that keeps the queue (`enqueue` = (priority,
        max_running)), its queue entry are one transaction: a failure leaves no half-made job."""

    @abstractmethod
    def get(self, tenant: str, job_id: str) -> Job:
        """The job, or NotFound — also when it belongs to another tenant."""

    @abstractmethod
    def load(self, job_id: str) -> Job:
        """The job by id alone, for the gateway's own use (never with a client-supplied tenant check skipped)."""

    @abstractmethod
    def snapshot(self, job_id: str) -> gateway_pb2.Video:
        """A copy of the job's current Video."""

    @abstractmethod
    def list(self, tenant: str, *, status: int = 0, limit: int = 20, offset: int = 0) -> list[Job]: ...

    @abstractmethod
    def update(self, job_id: str, mutate, *, fence: Fence | None = None) -> gateway_pb2.Video:
        """Apply mutate(video) under the store's lock; returns a copy of the new video. Fenced (and
        nothing changed) when `fence` no longer holds."""

    @abstractmethod
    def finish(self, job_id: str, mutate, event: gateway_pb2.VideoEvent, *,
               fence: Fence | None = None) -> gateway_pb2.Video | None:  # fmt: skip
        """Terminal transition + its event, atomically; None (and no event) if the job already ended
        or `fence` no longer holds."""

    @abstractmethod
    def by_request(self, tenant: str, request_id: str) -> Job | None:
        """The tenant's job created with this idempotency key, if any."""

    @abstractmethod
    def by_watermark(self, tenant: str, payload: str) -> Job | None:
        """The tenant's newest job whose video carries this invisible payload."""

    @abstractmethod
    def active_count(self, tenant: str) -> int:
        """The tenant's jobs that are QUEUED or RUNNING."""

    @abstractmethod
    def by_status(self, *statuses: int) -> list[Job]:
        """All jobs in these states, oldest first (recovery after a restart)."""

    @abstractmethod
    def count_since(self, tenant: str, since: float) -> tuple[int, float | None]:
        """How many jobs the tenant created since `since`, and when the oldest of them was created."""

    @abstractmethod
    def append_event(self, job_id: str, event: gateway_pb2.VideoEvent, *,
                     fence: Fence | None = None) -> gateway_pb2.VideoEvent:  # fmt: skip
        """Append with the next sequence number; nothing is appended once the job has ended (its
        terminal event stays the last one; the event comes back with sequence 0), nor when `fence`
        no longer holds."""

    @abstractmethod
    def wait_events(self, job_id: str, after: int, timeout: float) -> list[gateway_pb2.VideoEvent]:
        """Events with sequence > after, waiting up to `timeout` seconds for the first one."""

    # --- the result cache (key -> the job whose stored file answers it) -----------------------------------
    @abstractmethod
    def cache_get(self, key: str) -> str | None:
        """The job id cached under `key`, if any."""

    @abstractmethod
    def cache_put(self, key: str, job_id: str) -> None: ...

    @abstractmethod
    def cache_drop(self, job_id: str) -> None:
        """Forget every key that points at this job (its file is gone or it was regenerated)."""

    # --- feedback, refusals, metering and retention ----------------------------------------------------
    @abstractmethod
    def add_feedback(self, fid: str, tenant: str, job_id: str, rating: int, reason: str) -> None: ...

    @abstractmethod
    def feedback_for(self, job_id: str) -> list[tuple[int, str]]:
        """(rating, reason) of every feedback on the job, oldest first."""

    @abstractmethod
    def add_blocked(self, tenant: str, category: str) -> None:
        """Record a refused prompt: its category only, never its text."""

    @abstractmethod
    def count_blocked(self, tenant: str, since: float = 0.0) -> int: ...

    @abstractmethod
    def count_status(self, status: int) -> int:
        """How many jobs of every tenant have this status now (the review-backlog gauge)."""

    @abstractmethod
    def tenant_jobs(self, tenant: str, since: float = 0.0) -> list[Job]:
        """The tenant's jobs created since `since`, oldest first (metering)."""

    @abstractmethod
    def finished_before(self, before: float) -> list[Job]:
        """Jobs with a stored file created before `before` (retention)."""

    def queue(self, capacity: int, aging: float, lease_seconds: float):
        """The job queue that goes with this store: one gateway's in-process queue (scheduler.JobQueue),
        unless the store shares its queue between replicas (PostgreSQL: leased, in the database)."""
        from gateway.scheduler import JobQueue

        return JobQueue(capacity, aging)

    # --- shared limits -------------------------------------------------------------------------------
    @abstractmethod
    def take_token(self, tenant: str, rate_per_second: float, burst: int, now: float) -> float:
        """The tenant's token bucket, kept in the store so every gateway on it draws from the same one:
        0 when a token was taken, else the seconds until one is there (nothing taken)."""

    @abstractmethod
    def tenant_lock(self, tenant: str) -> AbstractContextManager:
        """Held around a tenant's admission checks and the insert that follows them, so the in-flight
        cap and the quota hold across every gateway on this store (a process lock for SQLite, an
        advisory lock for PostgreSQL)."""

    @abstractmethod
    def close(self) -> None: ...
