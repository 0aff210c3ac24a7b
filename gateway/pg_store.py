"""PostgreSQL job store and job queue: the shared state of several gateway replicas.

Everything a gateway keeps about jobs lives here, so any replica can serve any call: jobs and
their event logs, the result cache, feedback, refused prompts, the rate-limit buckets, and the
queue itself (`PgJobQueue`). Streams on one replica follow jobs another runs: every event append
sends a NOTIFY, and `wait_events` wakes on it (with a short poll as the fallback for a missed one).

The queue (why not a queue library: procrastinate and pgqueuer claim by a fixed priority and
FIFO; ours orders by tier priority with aging, skips tenants at their running cap, fences
writes by attempt and lease, and keeps the job row and the queue entry in one row so a
status change and a claim are one transaction — a dozen statements, below):

- `pop` claims the best waiting job, `SELECT … FOR UPDATE SKIP LOCKED` under a transaction-level
  advisory lock, so the per-tenant running caps are exact across replicas (claims are a few
  milliseconds; one at a time is no bottleneck), and stamps a lease (owner, expiry).
- The owner renews its leases while its jobs run (`renew`). A replica that dies stops renewing;
  any replica's `reap` puts a job whose lease expired back in the queue (QUEUED, same attempt
  count — the next start makes it attempt + 1) with a Queued event.
- A late write of the replica whose lease was taken is refused: every worker write carries a
  `Fence` (owner + attempt) checked in the write's transaction (gateway.jobs.Fence).

Times: the database's clock (`clock_timestamp()`) for leases and queue order, so replicas with
skewed clocks agree; the gateway's `time.time()` for job creation times (quota windows), as with
SQLite. Failures to reach the database become UNAVAILABLE with a retry delay, never INTERNAL.

Schema changes are versioned migrations (`schema_version` table), applied once under an advisory
lock by whichever replica starts first; a database from an older gateway is brought up to date.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from gateway.jobs import ENDED, TERMINAL, Fence, Fenced, Job, JobStore, now_ts, requeued
from gateway.scheduler import Entry
from videomesh.errors import NotFound, Unavailable
from videomesh.v1 import common_pb2, gateway_pb2

log = logging.getLogger("videomesh.gateway.pg")

EVENTS_CHANNEL = "videomesh_events"
QUEUE_CHANNEL = "videomesh_queue"
_MIGRATE_LOCK = 7_2001  # advisory lock keys (arbitrary, constant)
_CLAIM_LOCK = 7_2002
_NOW = "extract(epoch from clock_timestamp())"

MIGRATIONS: list[str] = [
    # 1: the tables of the SQLite store
    """
    CREATE TABLE jobs (
      id TEXT PRIMARY KEY,
      tenant TEXT NOT NULL,
      request_id TEXT NOT NULL DEFAULT '',
      tier TEXT NOT NULL,
      webhook TEXT NOT NULL DEFAULT '',
      watermark TEXT NOT NULL DEFAULT '',
      status INTEGER NOT NULL,
      created DOUBLE PRECISION NOT NULL,
      video BYTEA NOT NULL,
      last_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX jobs_request ON jobs(tenant, request_id) WHERE request_id <> '';
    CREATE INDEX jobs_tenant ON jobs(tenant, created);
    CREATE INDEX jobs_status ON jobs(status);
    CREATE INDEX jobs_watermark ON jobs(tenant, watermark);
    CREATE TABLE events (job_id TEXT NOT NULL, seq INTEGER NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (job_id, seq));
    CREATE TABLE cache (key TEXT PRIMARY KEY, job_id TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
    CREATE INDEX cache_job ON cache(job_id);
    CREATE TABLE feedback (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, job_id TEXT NOT NULL, rating INTEGER NOT NULL,
                           reason TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
    CREATE INDEX feedback_job ON feedback(job_id);
    CREATE TABLE blocked (tenant TEXT NOT NULL, category TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
    CREATE INDEX blocked_tenant ON blocked(tenant, created);
    """,
    # 2: the queue and its leases, in the job's row
    """
    CREATE SEQUENCE queue_seq;
    ALTER TABLE jobs
      ADD COLUMN q_state TEXT,                       -- NULL (not queued) | waiting | claimed
      ADD COLUMN q_priority INTEGER NOT NULL DEFAULT 0,
      ADD COLUMN q_max_running INTEGER NOT NULL DEFAULT 1,
      ADD COLUMN q_enqueued DOUBLE PRECISION NOT NULL DEFAULT 0,
      ADD COLUMN q_not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
      ADD COLUMN q_seq BIGINT NOT NULL DEFAULT 0,
      ADD COLUMN lease_owner TEXT,
      ADD COLUMN lease_until DOUBLE PRECISION;
    CREATE INDEX jobs_queue ON jobs(q_state, tenant) WHERE q_state IS NOT NULL;
    """,
    # 3: rate-limit buckets shared by every replica
    """
    CREATE TABLE rate_buckets (tenant TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL,
                               stamp DOUBLE PRECISION NOT NULL);
    """,
    # 4: tenants and API keys (SHA-256 hashes), shared by every replica (gateway/pg_tenants.py)
    """
    CREATE TABLE tenants (name TEXT PRIMARY KEY, tier TEXT NOT NULL, webhook_url TEXT NOT NULL DEFAULT '',
                          webhook_secret TEXT NOT NULL);
    CREATE TABLE api_keys (hash TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name), id TEXT NOT NULL,
                           revoked BOOLEAN NOT NULL DEFAULT false, expires DOUBLE PRECISION);
    CREATE INDEX api_keys_tenant ON api_keys(tenant);
    """,
    # 5: the gateway replicas alive (each stamps its row): they share the denoisers' capacity between them
    """
    CREATE TABLE gateways (owner TEXT PRIMARY KEY, seen DOUBLE PRECISION NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
_DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
IDLE_IN_TRANSACTION = 5.0  # s: a session idle inside a transaction this long is ended by the server
ADMISSION_HOLD = 15.0  # s: the same for an admission lock's transaction


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _db_unavailable(what: str = "unavailable") -> Unavailable:
    """What a call gets when the database cannot serve it: UNAVAILABLE with a retry delay (never INTERNAL)."""
    return Unavailable(
        f"the job database is {what}; retry shortly", retry_after=2.0, reason="DATABASE_UNAVAILABLE"
    )


def _unavailable(fn):
    """The database is down or unreachable: UNAVAILABLE with a retry delay (never INTERNAL)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _DB_ERRORS as err:
            log.warning("database unavailable in %s: %s", fn.__name__, _first_line(err))
            raise _db_unavailable() from None

    return wrapper


def migrate(conn: psycopg.Connection, upto: int = SCHEMA_VERSION) -> int:
    """Apply the migrations this database lacks, up to `upto`; returns the version it is at."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = row[0] or 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"the database's schema version {version} is newer than this gateway's "
                               f"({SCHEMA_VERSION}); upgrade the gateway")  # fmt: skip
        for n in range(version, min(upto, SCHEMA_VERSION)):
            conn.execute(MIGRATIONS[n])
            conn.execute("INSERT INTO schema_version VALUES (%s)", (n + 1,))
            log.info("database schema migrated to version %d", n + 1)
            version = n + 1
    return version


class PostgresJobStore(JobStore):
    def __init__(self, url: str, *, pool_size: int = 16, timeout: float = 5.0):
        self.url = url
        self.timeout = timeout
        with psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout))) as conn:
            self.schema_version = migrate(conn)
        # A replica that freezes (a long pause, a partition with its TCP connections still open) in the middle
        # of a transaction would keep its row and advisory locks, and every other replica would wait on them:
        # the server ends a session idle inside a transaction (ours last milliseconds), and no statement
        # waits on a lock for more than 10 s (it fails UNAVAILABLE instead).
        opts = (
            f"-c lock_timeout=10000 -c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION * 1000)}"
        )
        self.pool = ConnectionPool(url, min_size=2, max_size=pool_size, timeout=timeout, open=True,
                                   kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout)), "options": opts},
                                   check=ConnectionPool.check_connection, name="videomesh-gateway")  # fmt: skip
        # admission locks (tenant_lock): a pool of their own; a lock's transaction stays open while the
        # admission runs on the main pool, so its idle limit is longer
        lock_opts = (
            f"-c lock_timeout=10000 -c idle_in_transaction_session_timeout={int(ADMISSION_HOLD * 1000)}"
        )
        self.lock_pool = ConnectionPool(url, min_size=0, max_size=pool_size, timeout=timeout, open=True,
                                        kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout)),
                                                "options": lock_opts},
                                        check=ConnectionPool.check_connection, name="videomesh-admission")  # fmt: skip
        self._local_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(
            threading.Lock
        )
        self._events = threading.Condition()
        self._queue = threading.Condition()
        self._event_gen = 0
        self._closed = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="pg-listen", daemon=True)
        self._listener.start()

    # --- plumbing -----------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed.set()
        self.pool.close()
        self.lock_pool.close()
        self._listener.join(timeout=3)

    def _listen(self) -> None:
        """One connection LISTENs for event and queue notifications and wakes this process's waiters;
        it reconnects after an outage (and wakes everyone then: notifications sent meanwhile are lost)."""
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                    conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    conn.execute(f"LISTEN {QUEUE_CHANNEL}")
                    self._wake_all()
                    while not self._closed.is_set():
                        for n in conn.notifies(timeout=0.5):
                            if n.channel == EVENTS_CHANNEL:
                                self._wake(self._events)
                            else:  # one idle worker tries a claim (it wakes the next if it got one)
                                self._wake(self._queue, everyone=False)
            except psycopg.Error:
                if self._closed.wait(0.5):
                    return

    def _wake(self, cond: threading.Condition, everyone: bool = True) -> None:
        with cond:
            if cond is self._events:
                self._event_gen += 1
            if everyone:
                cond.notify_all()
            else:
                cond.notify()

    def _wake_all(self) -> None:
        self._wake(self._events)
        self._wake(self._queue)

    def _rows(self, sql: str, args=()) -> list[tuple]:
        with self.pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def _one(self, sql: str, args=()):
        with self.pool.connection() as conn:
            return conn.execute(sql, args).fetchone()

    def _exec(self, sql: str, args=()) -> None:
        with self.pool.connection() as conn:
            conn.execute(sql, args)

    _COLS = "id, tenant, request_id, tier, webhook, video"

    @staticmethod
    def _job(row) -> Job:
        jid, tenant, request_id, tier, webhook, blob = row
        return Job(id=jid, tenant=tenant, request_id=request_id, tier=tier, webhook=webhook,
                   video=gateway_pb2.Video.FromString(bytes(blob)))  # fmt: skip

    def _select(self, where: str, args=()) -> list[Job]:
        return [self._job(r) for r in self._rows(f"SELECT {self._COLS} FROM jobs WHERE {where}", args)]

    # --- jobs ---------------------------------------------------------------------------------------
    @_unavailable
    def create(self, job: Job, first_event: gateway_pb2.VideoEvent | None = None,
               enqueue: tuple[int, int] | None = None) -> Job:  # fmt: skip
        """The job, its first event and its queue entry in one transaction."""
        with self.pool.connection() as conn, conn.transaction():
            priority, max_running = enqueue or (0, 1)
            row = conn.execute(
                "INSERT INTO jobs (id, tenant, request_id, tier, webhook, watermark, status, created, video, q_state,"
                " q_priority, q_max_running, q_enqueued, q_not_before, q_seq)"
                f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {_NOW}, {_NOW},"
                " CASE WHEN %s THEN nextval('queue_seq') ELSE 0 END) ON CONFLICT DO NOTHING RETURNING id",
                (job.id, job.tenant, job.request_id, job.tier, job.webhook, job.video.watermark, job.video.status,
                 time.time(), job.video.SerializeToString(), "waiting" if enqueue else None, priority, max_running,
                 enqueue is not None),
            ).fetchone()  # fmt: skip
            if row is not None:
                if first_event is not None:
                    self._append(conn, job.id, first_event)
                if enqueue is not None:
                    conn.execute("SELECT pg_notify(%s, '')", (QUEUE_CHANNEL,))
        if row is None and job.request_id:  # the same idempotency key won a race: that job is the answer
            found = self.by_request(job.tenant, job.request_id)
            if found is not None:
                return found
        return job

    @_unavailable
    def get(self, tenant: str, job_id: str) -> Job:
        found = self._select("id = %s AND tenant = %s", (job_id, tenant))
        if not found:
            raise NotFound(f"video {job_id!r} not found", field="id")
        return found[0]

    @_unavailable
    def load(self, job_id: str) -> Job:
        found = self._select("id = %s", (job_id,))
        if not found:
            raise NotFound(f"video {job_id!r} not found", field="id")
        return found[0]

    def snapshot(self, job_id: str) -> gateway_pb2.Video:
        return self.load(job_id).video

    @_unavailable
    def list(self, tenant: str, *, status: int = 0, limit: int = 20, offset: int = 0) -> list[Job]:
        where = (
            "tenant = %s"
            + (" AND status = %s" if status else "")
            + " ORDER BY created DESC, id DESC LIMIT %s OFFSET %s"
        )
        args = (tenant, status, limit, offset) if status else (tenant, limit, offset)
        return self._select(where, args)

    @_unavailable
    def by_request(self, tenant: str, request_id: str) -> Job | None:
        found = self._select("tenant = %s AND request_id = %s", (tenant, request_id))
        return found[0] if found else None

    @_unavailable
    def by_watermark(self, tenant: str, payload: str) -> Job | None:
        found = self._select(
            "tenant = %s AND watermark = %s ORDER BY created DESC LIMIT 1", (tenant, payload)
        )
        return found[0] if found else None

    @_unavailable
    def active_count(self, tenant: str) -> int:
        return self._one("SELECT count(*) FROM jobs WHERE tenant = %s AND status IN (%s, %s)",
                         (tenant, common_pb2.QUEUED, common_pb2.RUNNING))[0]  # fmt: skip

    @_unavailable
    def by_status(self, *statuses: int) -> list[Job]:
        return self._select("status = ANY(%s) ORDER BY created, id", (list(statuses),))

    @_unavailable
    def count_since(self, tenant: str, since: float) -> tuple[int, float | None]:
        n, oldest = self._one("SELECT count(*), min(created) FROM jobs WHERE tenant = %s AND created >= %s",
                              (tenant, since))  # fmt: skip
        return n, oldest

    def _locked(self, conn, job_id: str):
        row = conn.execute("SELECT video, lease_owner, q_state FROM jobs WHERE id = %s FOR UPDATE",
                           (job_id,)).fetchone()  # fmt: skip
        if row is None:
            raise NotFound(f"video {job_id!r} not found")
        return gateway_pb2.Video.FromString(bytes(row[0])), row[1], row[2] == "claimed"

    @_unavailable
    def update(self, job_id: str, mutate, *, fence: Fence | None = None) -> gateway_pb2.Video:
        with self.pool.connection() as conn, conn.transaction():
            video, owner, claimed = self._locked(conn, job_id)
            if fence is not None and not fence.holds(video, owner, claimed):
                raise Fenced(f"this replica's attempt {fence.attempt} of {job_id} no longer holds the job")
            mutate(video)
            video.update_time.CopyFrom(now_ts())
            conn.execute("UPDATE jobs SET video = %s, status = %s WHERE id = %s",
                         (video.SerializeToString(), video.status, job_id))  # fmt: skip
        return video

    @_unavailable
    def finish(self, job_id: str, mutate, event: gateway_pb2.VideoEvent, *,
               fence: Fence | None = None) -> gateway_pb2.Video | None:  # fmt: skip
        class _Rollback(Exception):
            pass

        try:
            with self.pool.connection() as conn, conn.transaction():
                video, owner, claimed = self._locked(conn, job_id)
                if video.status in TERMINAL or (fence is not None and not fence.holds(video, owner, claimed)):
                    raise _Rollback
                mutate(video)
                video.update_time.CopyFrom(now_ts())
                if event.WhichOneof("event") == "completed":
                    event.completed.video.CopyFrom(video)
                conn.execute("UPDATE jobs SET video = %s, status = %s WHERE id = %s",
                             (video.SerializeToString(), video.status, job_id))  # fmt: skip
                self._append(conn, job_id, event, force=True)
        except _Rollback:
            return None
        return video

    def _append(self, conn, job_id: str, event: gateway_pb2.VideoEvent, *, force: bool = False,
                fence: Fence | None = None) -> bool:  # fmt: skip
        """Next sequence number from the job row (so appends from any replica are serialised by the
        row lock); nothing once the job has ended unless `force` (the terminal event itself)."""
        if fence is not None:
            video, owner, claimed = self._locked(conn, job_id)
            if not fence.holds(video, owner, claimed):
                return False
        row = conn.execute(
            "UPDATE jobs SET last_seq = last_seq + 1 WHERE id = %s" + ("" if force else " AND NOT (status = ANY(%s))")
            + " RETURNING last_seq",
            (job_id,) if force else (job_id, list(ENDED)),
        ).fetchone()  # fmt: skip
        if row is None:
            return False
        event.video_id = job_id
        event.sequence = row[0]
        event.time.CopyFrom(now_ts())
        conn.execute("INSERT INTO events (job_id, seq, data) VALUES (%s, %s, %s)",
                     (job_id, event.sequence, event.SerializeToString()))  # fmt: skip
        conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, job_id))
        return True

    @_unavailable
    def append_event(self, job_id: str, event: gateway_pb2.VideoEvent, *,
                     fence: Fence | None = None) -> gateway_pb2.VideoEvent:  # fmt: skip
        with self.pool.connection() as conn, conn.transaction():
            self._append(conn, job_id, event, fence=fence)
        return event

    @_unavailable
    def _events_after(self, job_id: str, after: int) -> list[gateway_pb2.VideoEvent]:
        rows = self._rows(
            "SELECT data FROM events WHERE job_id = %s AND seq > %s ORDER BY seq", (job_id, after)
        )
        return [gateway_pb2.VideoEvent.FromString(bytes(r[0])) for r in rows]

    def wait_events(self, job_id: str, after: int, timeout: float) -> list[gateway_pb2.VideoEvent]:
        deadline = time.monotonic() + timeout
        while True:
            with self._events:
                gen = self._event_gen
            evs = self._events_after(job_id, after)
            left = deadline - time.monotonic()
            if evs or left <= 0:
                return evs
            with self._events:  # woken by any job's event; a missed NOTIFY costs at most 0.5 s
                if self._event_gen == gen:
                    self._events.wait(min(left, 0.5))

    # --- cache, feedback, refusals, metering, retention ---------------------------------------------------
    @_unavailable
    def cache_get(self, key: str) -> str | None:
        row = self._one("SELECT job_id FROM cache WHERE key = %s", (key,))
        return row[0] if row else None

    @_unavailable
    def cache_put(self, key: str, job_id: str) -> None:
        self._exec("INSERT INTO cache (key, job_id, created) VALUES (%s, %s, %s) ON CONFLICT (key) DO UPDATE"
                   " SET job_id = EXCLUDED.job_id, created = EXCLUDED.created", (key, job_id, time.time()))  # fmt: skip

    @_unavailable
    def cache_drop(self, job_id: str) -> None:
        self._exec("DELETE FROM cache WHERE job_id = %s", (job_id,))

    @_unavailable
    def add_feedback(self, fid: str, tenant: str, job_id: str, rating: int, reason: str) -> None:
        self._exec("INSERT INTO feedback VALUES (%s, %s, %s, %s, %s, %s)",
                   (fid, tenant, job_id, rating, reason, time.time()))  # fmt: skip

    @_unavailable
    def feedback_for(self, job_id: str) -> list[tuple[int, str]]:
        return [tuple(r) for r in self._rows("SELECT rating, reason FROM feedback WHERE job_id = %s ORDER BY created",
                                             (job_id,))]  # fmt: skip

    @_unavailable
    def add_blocked(self, tenant: str, category: str) -> None:
        self._exec("INSERT INTO blocked VALUES (%s, %s, %s)", (tenant, category, time.time()))

    @_unavailable
    def count_blocked(self, tenant: str, since: float = 0.0) -> int:
        return self._one("SELECT count(*) FROM blocked WHERE tenant = %s AND created >= %s", (tenant, since))[
            0
        ]

    @_unavailable
    def count_status(self, status: int) -> int:
        return self._one("SELECT count(*) FROM jobs WHERE status = %s", (status,))[0]

    @_unavailable
    def tenant_jobs(self, tenant: str, since: float = 0.0) -> list[Job]:
        return self._select("tenant = %s AND created >= %s ORDER BY created", (tenant, since))

    @_unavailable
    def finished_before(self, before: float) -> list[Job]:
        return self._select("created < %s AND status IN (%s, %s) ORDER BY created",
                            (before, common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW))  # fmt: skip

    # --- shared limits ----------------------------------------------------------------------------------
    @_unavailable
    def take_token(self, tenant: str, rate_per_second: float, burst: int, now: float) -> float:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO rate_buckets VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (tenant, float(burst), now),
            )
            tokens, stamp = conn.execute("SELECT tokens, stamp FROM rate_buckets WHERE tenant = %s FOR UPDATE",
                                         (tenant,)).fetchone()  # fmt: skip
            tokens = min(float(burst), tokens + max(0.0, now - stamp) * rate_per_second)
            taken = tokens >= 1.0
            conn.execute("UPDATE rate_buckets SET tokens = %s, stamp = %s WHERE tenant = %s",
                         (tokens - 1.0 if taken else tokens, max(now, stamp), tenant))  # fmt: skip
        if taken:
            return 0.0
        return (1.0 - tokens) / rate_per_second if rate_per_second > 0 else 60.0

    @contextlib.contextmanager
    def tenant_lock(self, tenant: str):
        """A transaction-level advisory lock on a connection of its own, held while the admission checks and
        the insert run (on the main pool's connections, each committed before the lock is let go). Threads of
        this process queue on a local lock first, and lock connections come from a pool of their own: a waiter
        never holds a connection the lock holder needs. A holder that freezes loses the lock after
        ADMISSION_HOLD s (the server ends its idle transaction)."""
        with self._local_locks[tenant]:
            try:
                conn = self.lock_pool.getconn()
            except _DB_ERRORS:
                raise _db_unavailable() from None
            try:
                try:
                    conn.execute("BEGIN")
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("admit:" + tenant,))
                except (*_DB_ERRORS, psycopg.errors.LockNotAvailable):
                    raise _db_unavailable("unavailable or busy") from None
                yield
            finally:
                try:  # nothing was written on it: ending the transaction frees the lock
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    conn.close()  # the session is gone (and its lock with it): the pool replaces it
                self.lock_pool.putconn(conn)

    def queue(self, capacity: int, aging: float, lease_seconds: float, owner: str = "") -> PgJobQueue:
        return PgJobQueue(self, capacity, aging, lease_seconds, owner)


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class PgJobQueue:
    """The gateway's queue, in the jobs table (the same interface as scheduler.JobQueue, plus leases)."""

    leased = True

    def __init__(
        self, store: PostgresJobStore, capacity: int, aging: float, lease_seconds: float, owner: str = ""
    ):
        self.store = store
        self.capacity = capacity
        self.aging = aging
        self.lease = lease_seconds
        self.owner = owner or replica_id()
        self._closed = threading.Event()

    @_unavailable
    def __len__(self) -> int:
        return self.store._one("SELECT count(*) FROM jobs WHERE q_state = 'waiting'")[0]

    def full(self) -> bool:
        return len(self) >= self.capacity

    def close(self) -> None:
        self._closed.set()
        self.store._wake(self.store._queue)
        try:  # leaving: the others need not wait for this row to go stale to take its share
            self.store._exec("DELETE FROM gateways WHERE owner = %s", (self.owner,))
        except _DB_ERRORS:
            pass

    @_unavailable
    def peers(self, period: float) -> int:
        """Stamp this replica alive; -> the replicas stamped within the last 3 periods (this one included)."""
        with self.store.pool.connection() as conn:
            conn.execute(f"INSERT INTO gateways (owner, seen) VALUES (%s, {_NOW}) "
                         f"ON CONFLICT (owner) DO UPDATE SET seen = EXCLUDED.seen", (self.owner,))  # fmt: skip
            conn.execute(f"DELETE FROM gateways WHERE seen < {_NOW} - %s", (max(60.0, 30 * period),))
            return conn.execute(f"SELECT count(*) FROM gateways WHERE seen >= {_NOW} - %s",
                                (3 * period,)).fetchone()[0]  # fmt: skip

    @_unavailable
    def push(self, job_id: str, tenant: str, priority: int, max_running: int, *, delay: float = 0.0,
             force: bool = False) -> int:  # fmt: skip
        """Enqueue (again): waiting, no lease. `force` admits beyond capacity (the gateway checks the
        bound at admission, under the tenant lock)."""
        if not force and self.full():
            raise OverflowError("queue full")
        with self.store.pool.connection() as conn, conn.transaction():
            conn.execute(
                f"UPDATE jobs SET q_state = 'waiting', q_priority = %s, q_max_running = %s,"
                f" q_enqueued = CASE WHEN q_enqueued > 0 THEN q_enqueued ELSE {_NOW} END,"
                f" q_not_before = {_NOW} + %s, q_seq = nextval('queue_seq'), lease_owner = NULL, lease_until = NULL"
                " WHERE id = %s",
                (priority, max_running, delay, job_id),
            )  # fmt: skip
            conn.execute("SELECT pg_notify(%s, '')", (QUEUE_CHANNEL,))
        return self.position(job_id) or 1

    @_unavailable
    def remove(self, job_id: str) -> bool:
        row = self.store._one("UPDATE jobs SET q_state = NULL WHERE id = %s AND q_state = 'waiting' RETURNING id",
                              (job_id,))  # fmt: skip
        return row is not None

    @_unavailable
    def position(self, job_id: str) -> int | None:
        row = self.store._one(
            f"WITH w AS (SELECT id, row_number() OVER (ORDER BY q_priority - ({_NOW} - q_enqueued) / %s, q_seq) AS pos"
            " FROM jobs WHERE q_state = 'waiting') SELECT pos FROM w WHERE id = %s",
            (self.aging, job_id),
        )  # fmt: skip
        return row[0] if row else None

    def _claim(self) -> Entry | None:
        with self.store.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CLAIM_LOCK,))
            row = conn.execute(
                f"""WITH running AS (SELECT tenant, count(*) AS n FROM jobs WHERE q_state = 'claimed' GROUP BY tenant)
                SELECT j.id, j.tenant, j.q_priority, j.q_max_running, j.q_enqueued, j.q_seq,
                       {_NOW} - j.q_enqueued FROM jobs j
                LEFT JOIN running r ON r.tenant = j.tenant
                WHERE j.q_state = 'waiting' AND j.q_not_before <= {_NOW} AND COALESCE(r.n, 0) < j.q_max_running
                ORDER BY j.q_priority - ({_NOW} - j.q_enqueued) / %s, j.q_seq
                LIMIT 1 FOR UPDATE OF j SKIP LOCKED""",
                (self.aging,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(f"UPDATE jobs SET q_state = 'claimed', lease_owner = %s, lease_until = {_NOW} + %s"
                         " WHERE id = %s", (self.owner, self.lease, row[0]))  # fmt: skip
        jid, tenant, prio, max_running, enq, seq, waited = row
        return Entry(
            jid, tenant, prio, max_running, enq, seq, owner=self.owner, waited=max(0.0, float(waited))
        )

    def pop(self, timeout: float | None = None) -> Entry | None:
        """Claim the best job that may run now, waiting up to `timeout`; None when closed or timed out.
        A NOTIFY (a push, a finished job freeing a tenant's slot) wakes one idle worker of each replica,
        and a worker that claimed wakes the next, so a burst drains without every worker of every
        replica racing for each job; idle workers poll every second besides (delayed retries)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            try:
                e = self._claim()
            except _DB_ERRORS as err:
                log.warning("queue: database unavailable (%s); retrying", _first_line(err))
                e = None
            if e is not None:
                self.store._wake(
                    self.store._queue, everyone=False
                )  # there may be more: the next worker looks
                return e
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            with self.store._queue:
                self.store._queue.wait(1.0 if left is None else min(left, 1.0))
        return None

    @_unavailable
    def done(self, job_id: str, tenant: str) -> None:
        """The worker is through with its claim: free the tenant's slot. A job that has not ended (its
        attempt was stopped for shutdown, or the worker crashed) is handed back at once: it re-runs on
        any replica as attempt + 1, without waiting for its lease to expire."""
        with self.store.pool.connection() as conn, conn.transaction():
            ended = conn.execute(
                "UPDATE jobs SET q_state = NULL, lease_owner = NULL, lease_until = NULL"
                " WHERE id = %s AND q_state = 'claimed' AND lease_owner = %s AND status = ANY(%s) RETURNING id",
                (job_id, self.owner, list(ENDED)),
            ).fetchone()  # fmt: skip
            if ended is None:
                conn.execute(f"UPDATE jobs SET lease_until = {_NOW} - 1 WHERE id = %s AND q_state = 'claimed'"
                             " AND lease_owner = %s", (job_id, self.owner))  # fmt: skip
            conn.execute("SELECT pg_notify(%s, '')", (QUEUE_CHANNEL,))
        if ended is None:
            self.reap()

    @_unavailable
    def renew(self, job_ids: list[str]) -> tuple[set[str], dict[str, int]]:
        """Extend this replica's leases on `job_ids`. Returns (lost, statuses): the ids whose lease is no
        longer this replica's (expired and reaped or taken), and every id's current status (so a cancel
        made on another replica reaches the worker here)."""
        if not job_ids:
            return set(), {}
        rows = self.store._rows(
            f"UPDATE jobs SET lease_until = {_NOW} + %s WHERE id = ANY(%s) AND lease_owner = %s AND q_state = 'claimed'"
            " RETURNING id",
            (self.lease, job_ids, self.owner),
        )  # fmt: skip
        held = {r[0] for r in rows}
        statuses = dict(self.store._rows("SELECT id, status FROM jobs WHERE id = ANY(%s)", (job_ids,)))
        return set(job_ids) - held, statuses

    @_unavailable
    def reap(self) -> list[str]:
        """Put every job whose lease expired back in the queue (any replica may do it; each expired job is
        taken by one, SKIP LOCKED). A job that was running re-runs as attempt + 1 under the same key."""
        reaped = []
        with self.store.pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                f"SELECT id, video, lease_owner FROM jobs WHERE q_state = 'claimed' AND lease_until < {_NOW}"
                " FOR UPDATE SKIP LOCKED"
            ).fetchall()  # fmt: skip
            for jid, blob, owner in rows:
                video = gateway_pb2.Video.FromString(bytes(blob))
                if video.status in ENDED:  # ended, but its worker died before it let go of the claim
                    conn.execute("UPDATE jobs SET q_state = NULL, lease_owner = NULL, lease_until = NULL WHERE id = %s",
                                 (jid,))  # fmt: skip
                    continue
                log.warning(
                    "job %s: the lease of %s expired (attempt %d): re-queued", jid, owner, video.attempt
                )
                if video.status == common_pb2.RUNNING:
                    requeued(video)
                    video.update_time.CopyFrom(now_ts())
                conn.execute(f"UPDATE jobs SET video = %s, status = %s, q_state = 'waiting', q_not_before = {_NOW},"
                             " lease_owner = NULL, lease_until = NULL WHERE id = %s",
                             (video.SerializeToString(), video.status, jid))  # fmt: skip
                self.store._append(conn, jid, gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=1)))
                reaped.append(jid)
            if reaped:
                conn.execute("SELECT pg_notify(%s, '')", (QUEUE_CHANNEL,))
        return reaped
