"""Job records, their event logs, and the JobStore interface.

A job's event log is the source of truth for streams: every event gets the next sequence
number of that job, and `wait_events(id, after)` blocks until there are newer ones, so
WatchVideo can resume after any sequence without losing or repeating events.
"""

from __future__ import annotations

import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from videomesh.errors import NotFound
from videomesh.v1 import common_pb2, gateway_pb2

TERMINAL = frozenset({common_pb2.SUCCEEDED, common_pb2.FAILED, common_pb2.CANCELLED})


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
    events: list[gateway_pb2.VideoEvent] = field(default_factory=list)


class JobStore(ABC):
    """Where jobs and their events live. Implementations must be thread-safe."""

    @abstractmethod
    def create(self, job: Job) -> Job:
        """Insert; if (tenant, request_id) exists already, return the existing job instead."""

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
    def update(self, job_id: str, mutate) -> gateway_pb2.Video:
        """Apply mutate(video) under the store's lock; returns a copy of the new video."""

    @abstractmethod
    def append_event(self, job_id: str, event: gateway_pb2.VideoEvent) -> gateway_pb2.VideoEvent: ...

    @abstractmethod
    def wait_events(self, job_id: str, after: int, timeout: float) -> list[gateway_pb2.VideoEvent]: ...


class MemoryJobStore(JobStore):
    """In-process store (tests, `videomesh up` without --data-dir persistence)."""

    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[tuple[str, str], str] = {}
        self._cond = threading.Condition()

    def create(self, job: Job) -> Job:
        with self._cond:
            if job.request_id and (job.tenant, job.request_id) in self._by_request:
                return self._jobs[self._by_request[(job.tenant, job.request_id)]]
            self._jobs[job.id] = job
            if job.request_id:
                self._by_request[(job.tenant, job.request_id)] = job.id
            return job

    def get(self, tenant: str, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.tenant != tenant:
                raise NotFound(f"video {job_id!r} not found", field="id")
            return job

    def load(self, job_id: str) -> Job:
        with self._cond:
            return self._jobs[job_id]

    def list(self, tenant: str, *, status: int = 0, limit: int = 20, offset: int = 0) -> list[Job]:
        with self._cond:
            jobs = [
                j
                for j in self._jobs.values()
                if j.tenant == tenant and (not status or j.video.status == status)
            ]
        jobs.sort(key=lambda j: (j.video.create_time.ToNanoseconds(), j.id), reverse=True)
        return jobs[offset : offset + limit]

    def update(self, job_id: str, mutate) -> gateway_pb2.Video:
        with self._cond:
            video = self._jobs[job_id].video
            mutate(video)
            video.update_time.CopyFrom(now_ts())
            out = gateway_pb2.Video()
            out.CopyFrom(video)
            return out

    def append_event(self, job_id: str, event: gateway_pb2.VideoEvent) -> gateway_pb2.VideoEvent:
        with self._cond:
            job = self._jobs[job_id]
            event.video_id = job_id
            event.sequence = len(job.events) + 1
            event.time.CopyFrom(now_ts())
            job.events.append(event)
            self._cond.notify_all()
            return event

    def wait_events(self, job_id: str, after: int, timeout: float) -> list[gateway_pb2.VideoEvent]:
        deadline = time.monotonic() + timeout
        with self._cond:
            job = self._jobs[job_id]
            while len(job.events) <= after:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            return list(job.events[after:])

    def snapshot(self, job_id: str) -> gateway_pb2.Video:
        with self._cond:
            out = gateway_pb2.Video()
            out.CopyFrom(self._jobs[job_id].video)
            return out
