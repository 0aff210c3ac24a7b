"""The JobStore contract on both stores (SQLite and a real PostgreSQL), fencing, shared rate limits,
schema migrations, and the PostgreSQL queue: claims by priority with aging, running caps across
replicas, leases that expire and are taken over (issue #21)."""

import threading
import time

import psycopg
import pytest

from gateway.jobs import Fence, Fenced, Job, new_id, now_ts, requeued
from gateway.sqlite_store import SQLiteJobStore
from videomesh.errors import Unavailable
from videomesh.v1 import common_pb2, gateway_pb2


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    else:
        from gateway.pg_store import PostgresJobStore

        s = PostgresJobStore(request.getfixturevalue("pg").database())
    yield s
    s.close()


def job(tenant="acme", request_id="", status=common_pb2.QUEUED):
    v = gateway_pb2.Video(id=new_id(), status=status, create_time=now_ts())
    return Job(id=v.id, tenant=tenant, video=v, request_id=request_id, tier="pro")


def start(v):
    v.status = common_pb2.RUNNING
    v.attempt += 1


def event(kind="progress"):
    if kind == "progress":
        return gateway_pb2.VideoEvent(progress=gateway_pb2.Progress(percent=1))
    return gateway_pb2.VideoEvent(completed=gateway_pb2.Completed())


def test_create_is_idempotent_per_tenant_and_tenants_are_apart(store):
    a = store.create(job(request_id="r1"))
    assert store.create(job(request_id="r1")).id == a.id
    assert store.create(job(tenant="other", request_id="r1")).id != a.id
    with pytest.raises(Exception, match="not found"):
        store.get("other", a.id)
    assert store.active_count("acme") == 1 and store.count_since("acme", 0)[0] == 1


def test_events_are_numbered_and_nothing_follows_the_terminal_one(store):
    j = store.create(job())
    for _ in range(3):
        store.append_event(j.id, event())
    store.update(j.id, start)
    done = store.finish(j.id, lambda v: setattr(v, "status", common_pb2.SUCCEEDED), event("completed"))
    assert done.status == common_pb2.SUCCEEDED
    assert store.finish(j.id, lambda v: setattr(v, "status", common_pb2.FAILED), event("completed")) is None
    late = store.append_event(j.id, event())
    assert late.sequence == 0
    evs = store.wait_events(j.id, 0, timeout=0)
    assert [e.sequence for e in evs] == [1, 2, 3, 4] and evs[-1].WhichOneof("event") == "completed"
    assert store.wait_events(j.id, 4, timeout=0.2) == []


def test_fenced_writes_of_a_superseded_attempt_are_refused(store):
    j = store.create(job())
    v1 = store.update(j.id, start)
    fence1 = Fence(attempt=v1.attempt)
    store.update(j.id, lambda v: setattr(v, "progress", 10), fence=fence1)  # holds
    store.update(j.id, requeued)  # the attempt is re-queued (a crash, a retry)...
    store.update(j.id, start)  # ...and attempt 2 starts
    with pytest.raises(Fenced):
        store.update(j.id, lambda v: setattr(v, "progress", 99), fence=fence1)
    assert store.append_event(j.id, event(), fence=fence1).sequence == 0
    assert store.finish(j.id, lambda v: setattr(v, "status", common_pb2.SUCCEEDED), event("completed"),
                        fence=fence1) is None  # fmt: skip
    assert store.snapshot(j.id).status == common_pb2.RUNNING and store.snapshot(j.id).progress == 0
    assert store.finish(j.id, lambda v: setattr(v, "status", common_pb2.SUCCEEDED), event("completed"),
                        fence=Fence(attempt=2)) is not None  # fmt: skip


def test_token_bucket_in_the_store(store):
    assert [store.take_token("t", 1.0, 3, 100.0) for _ in range(3)] == [0, 0, 0]
    assert 0.9 < store.take_token("t", 1.0, 3, 100.0) <= 1.0
    assert store.take_token("t", 1.0, 3, 101.01) == 0
    assert store.take_token("u", 1.0, 3, 100.0) == 0


def test_wait_events_wakes_on_an_append_from_another_store_on_the_same_database(pg):
    from gateway.pg_store import PostgresJobStore

    url = pg.database()
    a, b = PostgresJobStore(url), PostgresJobStore(url)
    try:
        j = a.create(job())
        got = []
        t = threading.Thread(target=lambda: got.extend(b.wait_events(j.id, 0, timeout=10)))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        a.append_event(j.id, event())
        t.join()
        assert [e.sequence for e in got] == [1] and time.monotonic() - t0 < 0.5  # NOTIFY, not the 0.5 s poll
    finally:
        a.close()
        b.close()


def test_migrations_bring_an_old_database_up_to_date_and_keep_its_jobs(pg):
    from gateway.pg_store import SCHEMA_VERSION, PostgresJobStore, migrate

    url = pg.database()
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrate(conn, upto=1) == 1  # a database written by the first schema
        j = job()
        conn.execute("INSERT INTO jobs (id, tenant, tier, status, created, video) VALUES (%s, %s, %s, %s, %s, %s)",
                     (j.id, j.tenant, j.tier, j.video.status, time.time(), j.video.SerializeToString()))  # fmt: skip
    store = PostgresJobStore(url)
    try:
        assert store.schema_version == SCHEMA_VERSION > 1
        assert store.load(j.id).tenant == "acme"
        q = store.queue(10, 30.0, 5.0)
        q.push(j.id, j.tenant, 0, 1)
        assert q.pop(timeout=1).job_id == j.id
    finally:
        store.close()
    again = PostgresJobStore(url)  # a second start changes nothing
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_sqlite_file_from_before_versioning_is_migrated(tmp_path):
    import sqlite3

    from gateway import sqlite_store

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(sqlite_store._MIGRATIONS[0])  # the old schema, user_version 0
    db.close()
    s = SQLiteJobStore(path)
    assert s._db.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    assert s.take_token("t", 1.0, 1, 0.0) == 0
    s.close()


# --- the PostgreSQL queue ------------------------------------------------------------------------------
@pytest.fixture
def replicas(pg):
    """Two stores on one database, as two gateway replicas would hold them."""
    from gateway.pg_store import PostgresJobStore

    url = pg.database()
    stores = [PostgresJobStore(url), PostgresJobStore(url)]
    yield stores
    for s in stores:
        s.close()


def queued(store, q, tenant, prio, max_running=4, delay=0.0):
    j = store.create(job(tenant=tenant))
    q.push(j.id, tenant, prio, max_running, delay=delay)
    return j.id


def test_priority_with_aging_and_running_caps_hold_across_replicas(replicas):
    a, b = replicas
    qa, qb = a.queue(100, 0.2, 30.0, owner="A"), b.queue(100, 0.2, 30.0, owner="B")
    old_free = queued(a, qa, "f", 10)
    time.sleep(0.2)
    pro = queued(b, qb, "p", 0)
    assert qa.pop(timeout=1).job_id == pro  # pushed through B, claimed by A: pro first
    time.sleep(0.1)
    assert qb.pop(timeout=1).job_id == old_free
    # aging: a free job that waited long enough beats a fresh pro job
    aged = queued(a, qa, "f2", 10)
    time.sleep(10 * 0.2 + 0.3)  # (10 - 0) levels at 0.2 s per level, and then some
    queued(b, qb, "p2", 0)
    assert qb.pop(timeout=1).job_id == aged
    # running cap 1 for tenant t: whichever replica claims, the second job waits for done()
    t1, t2 = queued(a, qa, "t", 5, max_running=1), queued(a, qa, "t", 5, max_running=1)
    got = [(qa, qa.pop(timeout=1)), (qb, qb.pop(timeout=1))]
    mine = [(q, e) for q, e in got if e and e.tenant == "t"]
    assert [e.job_id for _, e in mine] == [t1]  # the other one of tenant t was not handed out
    extra = qb.pop(timeout=0.3)
    assert extra is None or extra.tenant != "t"
    a.update(t1, lambda v: setattr(v, "status", common_pb2.SUCCEEDED))
    holder = mine[0][0]
    holder.done(t1, "t")
    assert qb.pop(timeout=2).job_id == t2


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced(replicas):
    a, b = replicas
    qa, qb = a.queue(100, 30.0, 0.6, owner="A"), b.queue(100, 30.0, 0.6, owner="B")
    jid = queued(a, qa, "acme", 0)
    e = qa.pop(timeout=1)
    old = a.update(jid, start, fence=Fence(e.owner))  # A starts attempt 1
    fence_a = Fence("A", old.attempt)
    lost, statuses = qa.renew([jid])
    assert lost == set() and statuses[jid] == common_pb2.RUNNING
    assert qb.reap() == []  # the lease is current: nobody may take it
    time.sleep(0.8)  # A stops renewing (it "died")
    assert qb.reap() == [jid]
    assert qb.reap() == []  # once
    v = b.snapshot(jid)
    assert v.status == common_pb2.QUEUED and v.attempt == 1
    eb = qb.pop(timeout=1)
    assert eb.job_id == jid and eb.owner == "B"
    new = b.update(jid, start, fence=Fence("B"))
    assert new.attempt == 2
    # A comes back: every write refused, and renew tells it the job is gone
    with pytest.raises(Fenced):
        a.update(jid, lambda v: setattr(v, "progress", 50), fence=fence_a)
    assert a.append_event(jid, event(), fence=fence_a).sequence == 0
    assert (
        a.finish(jid, lambda v: setattr(v, "status", common_pb2.SUCCEEDED), event("completed"), fence=fence_a)
        is None
    )
    assert qa.renew([jid])[0] == {jid}
    qa.done(jid, "acme")  # A letting go changes nothing: the claim is B's
    assert b.finish(jid, lambda v: setattr(v, "status", common_pb2.SUCCEEDED), event("completed"),
                    fence=Fence("B", 2)) is not None  # fmt: skip
    kinds = [ev.WhichOneof("event") for ev in b.wait_events(jid, 0, timeout=0)]
    assert kinds == ["queued", "completed"]  # the re-queue's event, then B's result; nothing of A's late


def test_done_hands_an_unfinished_job_back_at_once(replicas):
    a, b = replicas
    qa, qb = a.queue(100, 30.0, 60.0, owner="A"), b.queue(100, 30.0, 60.0, owner="B")
    jid = queued(a, qa, "acme", 0)
    qa.pop(timeout=1)
    a.update(jid, start)
    qa.done(jid, "acme")  # stopped for shutdown: still RUNNING
    e = qb.pop(timeout=1)
    assert e.job_id == jid and b.snapshot(jid).status == common_pb2.QUEUED  # no 60 s lease wait


def test_a_database_outage_is_unavailable_with_a_retry_delay(pg):
    from tests.pg import PgServer

    own = PgServer()  # its own server: this test stops it
    from gateway.pg_store import PostgresJobStore

    store = PostgresJobStore(own.database(), timeout=2.0)
    try:
        j = store.create(job())
        own.stop_server()
        with pytest.raises(Unavailable) as err:
            store.load(j.id)
        assert err.value.retry_after and err.value.reason == "DATABASE_UNAVAILABLE"
        own.start_server()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert store.load(j.id).id == j.id
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the store did not reconnect"
                time.sleep(0.2)
    finally:
        store.close()
        own.close()


def test_gateway_replicas_count_each_other_and_share_the_denoisers(replicas):
    """Each replica stamps itself alive in the database; they split the denoisers' capacity between them
    (rounded up), so N gateways do not each claim the whole pool's worth of jobs."""
    from types import SimpleNamespace

    from gateway.gateway import VideoGateway
    from gateway.scheduler import JobQueue

    a, b = (s.queue(10, 30.0, 5.0, owner=f"gw-{i}") for i, s in enumerate(replicas))
    assert a.peers(1.0) == 1  # b has not stamped yet
    assert b.peers(1.0) == 2 and a.peers(1.0) == 2
    b.close()  # leaving: gone from the count at once
    assert a.peers(1.0) == 1
    c = replicas[1].queue(10, 30.0, 5.0, owner="gw-stale")
    c.peers(0.2)
    time.sleep(0.7)  # c stops stamping: after 3 periods it is no longer counted
    assert a.peers(0.2) == 1
    assert JobQueue(10).peers(1.0) == 1  # SQLite: one gateway

    def sizes(capacity, replicas, gateways, **settings):
        gw = SimpleNamespace(model=SimpleNamespace(capacity=capacity),
                             settings=SimpleNamespace(**{"stage_slots": (), "workers": 0, **settings}))  # fmt: skip
        return VideoGateway._sizes(gw, replicas, gateways)

    assert sizes(2, 3, 1) == (6, (24, 6, 12, 24), 7)  # one gateway: the whole pool
    assert sizes(2, 3, 2) == (3, (12, 3, 6, 12), 4)  # two: half each
    assert sizes(1, 1, 3) == (1, (4, 1, 2, 4), 2)  # more gateways than slots: at least one each
    assert sizes(1, 2, 2, workers=5, stage_slots=(1, 1, 1, 1)) == (1, (1, 1, 1, 1), 5)  # fixed: kept
