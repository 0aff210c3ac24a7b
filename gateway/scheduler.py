"""The job queue: priority by tier with aging, per-tenant running caps, delayed retries.

A job's score is its tier priority minus the time it has waited divided by `aging`, so a
free job that has waited `aging * (free - pro)` seconds competes with a fresh pro job:
paying tenants go first, free ones never starve. Bounded: `push` refuses beyond `capacity`.

This is the queue of a single gateway (the SQLite store): it lives in the process and is rebuilt
from the store after a restart. Several replicas on PostgreSQL share `gateway.pg_store.PgJobQueue`,
which has the same interface plus leases (`leased = True`: renew, reap, release_all).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass


@dataclass
class Entry:
    job_id: str
    tenant: str
    priority: int
    max_running: int
    enqueued: float
    seq: int
    not_before: float = 0.0
    owner: str = ""  # the replica holding the job's lease (PgJobQueue); "" = no lease
    waited: float = 0.0  # seconds from enqueue to this claim (the queue-wait metric)


class JobQueue:
    leased = False  # no leases: one gateway owns its jobs (see PgJobQueue)
    owner = ""

    def __init__(self, capacity: int, aging: float = 30.0):
        self.capacity = capacity
        self.aging = aging
        self._entries: dict[str, Entry] = {}
        self._running: Counter[str] = Counter()
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cv:
            return len(self._entries)

    def full(self) -> bool:
        with self._cv:
            return len(self._entries) >= self.capacity

    def push(
        self,
        job_id: str,
        tenant: str,
        priority: int,
        max_running: int,
        *,
        delay: float = 0.0,
        force: bool = False,
    ) -> int:
        """Enqueue; returns the queue position. `force` admits beyond capacity (recovery, retries)."""
        with self._cv:
            if not force and len(self._entries) >= self.capacity:
                raise OverflowError("queue full")
            now = time.monotonic()
            self._entries[job_id] = Entry(
                job_id, tenant, priority, max_running, now, next(self._seq), now + delay
            )
            self._cv.notify_all()
            return self._position(job_id)

    def remove(self, job_id: str) -> bool:
        with self._cv:
            return self._entries.pop(job_id, None) is not None

    def done(self, job_id: str, tenant: str) -> None:
        """The worker is through with a popped job: free its tenant's running slot."""
        with self._cv:
            self._running[tenant] -= 1
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def peers(self, period: float) -> int:
        """The gateway replicas sharing this queue: one, this gateway (see PgJobQueue.peers)."""
        return 1

    def _score(self, e: Entry, now: float) -> tuple[float, int]:
        return (e.priority - (now - e.enqueued) / self.aging, e.seq)

    def _ready(self, now: float) -> list[Entry]:
        return [
            e
            for e in self._entries.values()
            if e.not_before <= now and self._running[e.tenant] < e.max_running
        ]

    def _position(self, job_id: str) -> int:
        now = time.monotonic()
        order = sorted(self._entries.values(), key=lambda e: self._score(e, now))
        return next(i for i, e in enumerate(order, 1) if e.job_id == job_id)

    def position(self, job_id: str) -> int | None:
        with self._cv:
            return self._position(job_id) if job_id in self._entries else None

    def pop(self, timeout: float | None = None) -> Entry | None:
        """Block until a job may run; mark its tenant as running one more. None when closed/timed out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._closed:
                now = time.monotonic()
                ready = self._ready(now)
                if ready:
                    e = min(ready, key=lambda x: self._score(x, now))
                    del self._entries[e.job_id]
                    self._running[e.tenant] += 1
                    e.waited = max(0.0, now - e.enqueued)
                    return e
                waits = [e.not_before - now for e in self._entries.values() if e.not_before > now]
                wait = min(waits) if waits else None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cv.wait(wait)
            return None
