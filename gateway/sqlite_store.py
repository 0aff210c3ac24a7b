"""SQLite (WAL) job store: jobs and their event logs survive a gateway restart.

One connection guarded by a lock (the gateway process owns the file); a condition variable
wakes stream watchers when an event is appended. Terminal transitions go through
`finish()`, which refuses to finish a job twice, so a job reaches exactly one terminal
state even when a re-run after a crash races a late cancel.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path

from gateway.jobs import ENDED, TERMINAL, Fence, Fenced, Job, JobStore, now_ts
from videomesh.errors import NotFound
from videomesh.v1 import common_pb2, gateway_pb2

# Versioned migrations (PRAGMA user_version): a file from before versioning has the first one's tables
# already (it is written IF NOT EXISTS, so it applies to both); each later one runs once, in order.
_MIGRATIONS: list[str] = []
_MIGRATIONS.append("""
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  request_id TEXT NOT NULL DEFAULT '',
  tier TEXT NOT NULL,
  webhook TEXT NOT NULL DEFAULT '',
  watermark TEXT NOT NULL DEFAULT '',
  status INTEGER NOT NULL,
  created REAL NOT NULL,
  video BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs(tenant, request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_watermark ON jobs(tenant, watermark);
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, job_id TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
  id TEXT PRIMARY KEY, tenant TEXT NOT NULL, job_id TEXT NOT NULL, rating INTEGER NOT NULL, reason TEXT NOT NULL,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blocked (tenant TEXT NOT NULL, category TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (job_id, seq)
);
""")
_MIGRATIONS.append("""
CREATE TABLE rate_buckets (tenant TEXT PRIMARY KEY, tokens REAL NOT NULL, stamp REAL NOT NULL);
""")
SCHEMA_VERSION = len(_MIGRATIONS)


class SQLiteJobStore(JobStore):
    def __init__(self, path: Path | str = ":memory:"):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()
        self._cond = threading.Condition()
        self._tenant_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this gateway's "
                               f"({SCHEMA_VERSION}); upgrade the gateway")  # fmt: skip
        for n in range(version, SCHEMA_VERSION):
            self._db.executescript(f"BEGIN; {_MIGRATIONS[n]}; PRAGMA user_version = {n + 1}; COMMIT;")

    def tenant_lock(self, tenant: str):
        return self._tenant_locks[tenant]  # one process owns the file: a lock per tenant is enough

    def take_token(self, tenant: str, rate_per_second: float, burst: int, now: float) -> float:
        with self._cond:
            row = self._db.execute(
                "SELECT tokens, stamp FROM rate_buckets WHERE tenant = ?", (tenant,)
            ).fetchone()
            tokens, stamp = row if row else (float(burst), now)
            tokens = min(float(burst), tokens + max(0.0, now - stamp) * rate_per_second)
            taken = tokens >= 1.0
            self._db.execute("INSERT OR REPLACE INTO rate_buckets VALUES (?, ?, ?)",
                             (tenant, tokens - 1.0 if taken else tokens, now))  # fmt: skip
        if taken:
            return 0.0
        return (1.0 - tokens) / rate_per_second if rate_per_second > 0 else 60.0

    def close(self) -> None:
        with self._cond:
            self._db.close()

    # --- helpers ------------------------------------------------------------------------------
    def _row_to_job(self, row) -> Job:
        jid, tenant, request_id, tier, webhook, blob = row
        return Job(id=jid, tenant=tenant, request_id=request_id, tier=tier, webhook=webhook,
                   video=gateway_pb2.Video.FromString(blob))  # fmt: skip

    def _select(self, where: str, args: tuple) -> list[Job]:
        rows = self._db.execute(
            f"SELECT id, tenant, request_id, tier, webhook, video FROM jobs WHERE {where}", args
        ).fetchall()
        return [self._row_to_job(r) for r in rows]

    # --- JobStore -------------------------------------------------------------------------------
    def create(self, job: Job, first_event: gateway_pb2.VideoEvent | None = None,
               enqueue: tuple[int, int] | None = None) -> Job:  # fmt: skip
        """`enqueue` is ignored: one gateway's queue is in its process (the gateway pushes after this)."""
        with self._cond:
            if job.request_id:
                found = self._select("tenant = ? AND request_id = ?", (job.tenant, job.request_id))
                if found:
                    return found[0]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, tenant, request_id, tier, webhook, watermark, status, created, video)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.tenant, job.request_id, job.tier, job.webhook, job.video.watermark, job.video.status,
                     time.time(), job.video.SerializeToString()),
                )  # fmt: skip
                if first_event is not None:
                    self._append(job.id, first_event)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._cond.notify_all()
            return job

    def get(self, tenant: str, job_id: str) -> Job:
        with self._cond:
            found = self._select("id = ? AND tenant = ?", (job_id, tenant))
        if not found:
            raise NotFound(f"video {job_id!r} not found", field="id")
        return found[0]

    def load(self, job_id: str) -> Job:
        with self._cond:
            found = self._select("id = ?", (job_id,))
        if not found:
            raise NotFound(f"video {job_id!r} not found", field="id")
        return found[0]

    def snapshot(self, job_id: str) -> gateway_pb2.Video:
        return self.load(job_id).video

    def list(self, tenant: str, *, status: int = 0, limit: int = 20, offset: int = 0) -> list[Job]:
        q = (
            "tenant = ?"
            + (" AND status = ?" if status else "")
            + " ORDER BY created DESC, id DESC LIMIT ? OFFSET ?"
        )
        args = (tenant, status, limit, offset) if status else (tenant, limit, offset)
        with self._cond:
            return self._select(q, args)

    def by_request(self, tenant: str, request_id: str) -> Job | None:
        with self._cond:
            found = self._select("tenant = ? AND request_id = ?", (tenant, request_id))
        return found[0] if found else None

    # --- product tables: result cache, feedback, refused prompts ----------------------------------
    def cache_get(self, key: str) -> str | None:
        with self._cond:
            row = self._db.execute("SELECT job_id FROM cache WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def cache_put(self, key: str, job_id: str) -> None:
        with self._cond:
            self._db.execute(
                "INSERT OR REPLACE INTO cache (key, job_id, created) VALUES (?, ?, ?)",
                (key, job_id, time.time()),
            )

    def cache_drop(self, job_id: str) -> None:
        with self._cond:
            self._db.execute("DELETE FROM cache WHERE job_id = ?", (job_id,))

    def add_feedback(self, fid: str, tenant: str, job_id: str, rating: int, reason: str) -> None:
        with self._cond:
            self._db.execute(
                "INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?)",
                (fid, tenant, job_id, rating, reason, time.time()),
            )

    def feedback_for(self, job_id: str) -> list[tuple[int, str]]:
        with self._cond:
            return self._db.execute(
                "SELECT rating, reason FROM feedback WHERE job_id = ? ORDER BY created", (job_id,)
            ).fetchall()

    def add_blocked(self, tenant: str, category: str) -> None:
        with self._cond:
            self._db.execute("INSERT INTO blocked VALUES (?, ?, ?)", (tenant, category, time.time()))

    def count_blocked(self, tenant: str, since: float = 0.0) -> int:
        with self._cond:
            return self._db.execute(
                "SELECT COUNT(*) FROM blocked WHERE tenant = ? AND created >= ?", (tenant, since)
            ).fetchone()[0]

    def count_status(self, status: int) -> int:
        with self._cond:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def tenant_jobs(self, tenant: str, since: float = 0.0) -> list[Job]:
        with self._cond:
            return self._select("tenant = ? AND created >= ? ORDER BY created", (tenant, since))

    def finished_before(self, before: float) -> list[Job]:
        """Jobs with a stored file created before `before` (retention)."""
        with self._cond:
            return self._select(
                "created < ? AND status IN (?, ?) ORDER BY created",
                (before, common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW),
            )

    def by_watermark(self, tenant: str, payload: str) -> Job | None:
        with self._cond:
            found = self._select("tenant = ? AND watermark = ? ORDER BY created DESC", (tenant, payload))
        return found[0] if found else None

    def active_count(self, tenant: str) -> int:
        with self._cond:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND status IN (?, ?)",
                (tenant, common_pb2.QUEUED, common_pb2.RUNNING),
            ).fetchone()
        return n

    def by_status(self, *statuses: int) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        with self._cond:
            return self._select(f"status IN ({marks}) ORDER BY created, id", tuple(statuses))

    def count_since(self, tenant: str, since: float) -> tuple[int, float | None]:
        """Jobs the tenant created since `since` (epoch s), and the oldest such creation time."""
        with self._cond:
            n, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(created) FROM jobs WHERE tenant = ? AND created >= ?", (tenant, since)
            ).fetchone()
        return n, oldest

    def update(self, job_id: str, mutate, *, fence: Fence | None = None) -> gateway_pb2.Video:
        with self._cond:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT video FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise NotFound(f"video {job_id!r} not found")
                video = gateway_pb2.Video.FromString(row[0])
                if fence is not None and not fence.holds(video):
                    raise Fenced(f"attempt {fence.attempt} of {job_id} no longer holds the job")
                mutate(video)
                video.update_time.CopyFrom(now_ts())
                self._db.execute(
                    "UPDATE jobs SET video = ?, status = ? WHERE id = ?",
                    (video.SerializeToString(), video.status, job_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return video

    def finish(self, job_id: str, mutate, event: gateway_pb2.VideoEvent, *,
               fence: Fence | None = None) -> gateway_pb2.Video | None:  # fmt: skip
        """Apply a terminal mutation and append its event in one transaction; None if already terminal."""
        with self._cond:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT video FROM jobs WHERE id = ?", (job_id,)).fetchone()
                video = gateway_pb2.Video.FromString(row[0])
                if video.status in TERMINAL or (fence is not None and not fence.holds(video)):
                    self._db.execute("ROLLBACK")
                    return None
                mutate(video)
                video.update_time.CopyFrom(now_ts())
                if event.WhichOneof("event") == "completed":
                    event.completed.video.CopyFrom(video)
                self._db.execute(
                    "UPDATE jobs SET video = ?, status = ? WHERE id = ?",
                    (video.SerializeToString(), video.status, job_id),
                )
                self._append(job_id, event)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._cond.notify_all()
            return video

    def _append(self, job_id: str, event: gateway_pb2.VideoEvent) -> gateway_pb2.VideoEvent:
        (last,) = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)
        ).fetchone()
        event.video_id = job_id
        event.sequence = last + 1
        event.time.CopyFrom(now_ts())
        self._db.execute(
            "INSERT INTO events (job_id, seq, data) VALUES (?, ?, ?)",
            (job_id, event.sequence, event.SerializeToString()),
        )
        return event

    def append_event(self, job_id: str, event: gateway_pb2.VideoEvent, *,
                     fence: Fence | None = None) -> gateway_pb2.VideoEvent:  # fmt: skip
        with self._cond:
            row = self._db.execute("SELECT status, video FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row[0] in ENDED:
                return event  # the job's last event is written: a late progress report is dropped
            if (
                row is not None
                and fence is not None
                and not fence.holds(gateway_pb2.Video.FromString(row[1]))
            ):
                return event  # an attempt that lost the job reports nothing more
            self._append(job_id, event)
            self._cond.notify_all()
            return event

    def _events_after(self, job_id: str, after: int) -> list[gateway_pb2.VideoEvent]:
        rows = self._db.execute(
            "SELECT data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
        ).fetchall()
        return [gateway_pb2.VideoEvent.FromString(r[0]) for r in rows]

    def wait_events(self, job_id: str, after: int, timeout: float) -> list[gateway_pb2.VideoEvent]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                evs = self._events_after(job_id, after)
                left = deadline - time.monotonic()
                if evs or left <= 0:
                    return evs
                self._cond.wait(left)
