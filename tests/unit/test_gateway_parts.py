"""Scheduling, admission and failure-handling parts of the gateway, without gRPC."""

import time

import pytest

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from gateway.scheduler import JobQueue
from gateway.sqlite_store import SQLiteJobStore
from gateway.tiers import DEFAULT_TIERS, RateLimiter, TierPolicy, tiers_from
from gateway.webhooks import sign, verify
from videomesh.errors import Unavailable


def test_pro_jumps_ahead_of_free_but_free_ages_in():
    q = JobQueue(capacity=100, aging=10.0)
    for i in range(5):
        q.push(f"free{i}", "f", priority=10, max_running=100)
    q.push("pro", "p", priority=0, max_running=100)
    assert q.pop().job_id == "pro"
    assert [q.pop().job_id for _ in range(2)] == ["free0", "free1"]  # FIFO within a tier
    # aging: a free job that waited long enough beats a fresh pro job
    q2 = JobQueue(capacity=10, aging=0.01)
    q2.push("old-free", "f", priority=10, max_running=9)
    time.sleep(0.15)  # 10 priority levels at 0.01 s each
    q2.push("new-pro", "p", priority=0, max_running=9)
    assert q2.pop().job_id == "old-free"


def test_queue_bound_running_cap_and_delay():
    q = JobQueue(capacity=2)
    q.push("a", "t", 0, max_running=1)
    q.push("b", "t", 0, max_running=1)
    with pytest.raises(OverflowError):
        q.push("c", "t", 0, max_running=1)
    assert q.pop().job_id == "a"
    assert q.pop(timeout=0.1) is None  # tenant t already runs its one allowed job
    q.done("x", "t")
    assert q.pop(timeout=0.1).job_id == "b"
    q.push("later", "u", 0, max_running=1, delay=0.3)
    t0 = time.monotonic()
    assert q.pop(timeout=2).job_id == "later" and time.monotonic() - t0 >= 0.25


def test_token_bucket_allows_burst_then_says_how_long_to_wait():
    policy = TierPolicy(
        "t", priority=0, max_active=9, max_running=1, daily_quota=9, rate_per_minute=60, burst=3
    )
    rl = RateLimiter(SQLiteJobStore())
    assert [rl.take("x", policy, now=100.0) for _ in range(3)] == [0, 0, 0]
    wait = rl.take("x", policy, now=100.0)
    assert 0.9 < wait <= 1.0
    assert rl.take("x", policy, now=101.01) == 0  # one token back after a second
    assert rl.take("y", policy, now=100.0) == 0  # buckets are per tenant


def test_breaker_opens_fails_fast_and_closes_after_probe():
    b = CircuitBreaker("upscaler", threshold=2, cooldown=60)
    b.failure()
    assert b.state == CLOSED
    b.failure()
    assert b.state == OPEN
    with pytest.raises(Unavailable) as e:
        b.before_call()
    assert e.value.reason == "CIRCUIT_OPEN" and e.value.retry_after > 0
    b.healthy()  # the health monitor sees it SERVING
    assert b.state == HALF_OPEN
    b.before_call()  # the one trial call
    with pytest.raises(Unavailable):
        b.before_call()  # no second trial in parallel
    b.success()
    assert b.state == CLOSED and b.transitions == [OPEN, HALF_OPEN, CLOSED]


def test_tier_overrides_from_config():
    tiers = tiers_from({"free": {"daily_quota": 3, "sizes": ["128x128"]}, "team": {"priority": 5}})
    assert tiers["free"].daily_quota == 3 and tiers["free"].sizes == ("128x128",)
    assert tiers["pro"] == DEFAULT_TIERS["pro"] and tiers["team"].priority == 5


def test_webhook_signature():
    body = b'{"a":1}'
    header = sign("s3cret", body, int(time.time()))
    assert verify("s3cret", body, header)
    assert not verify("other", body, header)
    assert not verify("s3cret", body + b" ", header)
    assert not verify("s3cret", body, sign("s3cret", body, int(time.time()) - 3600))  # replayed old delivery


def test_expects_motion_reads_still_phrasings_in_three_languages():
    from gateway.gateway import expects_motion

    still = ["Show me a huge orange round dot not moving", "a small green block staying in place",
             "a blue box remains stationary", "a red ball staying put", "一个蓝绿色的大盒子停在原地",
             "一个红色的小球没有移动", "白色背景上，一动不动的是一个绿色的小盒子", "オレンジの大きい円がじっとしている",
             "紫色の三角が微動だにしない", "a cube sitting motionless"]  # fmt: skip
    moving = ["a red ball moving right", "一个红色的小球向右移动", "赤いボールが右へ動く", "a woman jogging at dawn",
              "a box slides to the left"]  # fmt: skip
    assert [expects_motion(p) for p in still] == [False] * len(still)
    assert [expects_motion(p) for p in moving] == [True] * len(moving)


def test_the_job_store_interface_declares_everything_the_gateway_calls():
    """A second JobStore (issue #21) must not fail at run time on a method only SQLite has: every
    `store.<method>(` the gateway's modules call is declared abstract on JobStore."""
    import re
    from pathlib import Path

    from gateway.jobs import JobStore

    root = Path(__file__).resolve().parents[2] / "gateway"
    users = [
        f for f in root.glob("*.py") if f.name not in ("sqlite_store.py", "pg_store.py")
    ]  # not the stores
    called = {m for f in users for m in re.findall(r"\bstore\.([a-z_]+)\(", f.read_text())}
    declared = JobStore.__abstractmethods__ | {"queue"}  # queue(): the in-process JobQueue unless overridden
    assert called and called <= declared, called - declared


def test_postgres_with_local_storage_needs_it_declared_shared():
    from gateway.gateway import GatewaySettings

    url = "postgresql://u@db/videomesh"
    with pytest.raises(ValueError, match="storage is local"):
        GatewaySettings(database=url).validate()
    GatewaySettings(database=url, shared_storage=True).validate()
    GatewaySettings(database=url, storage="s3", s3_endpoint="s3:9000").validate()
    GatewaySettings().validate()  # SQLite: local storage is the default
    with pytest.raises(ValueError, match="lease_seconds"):
        GatewaySettings(database=url, shared_storage=True, lease_seconds=0.1).validate()


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://videos.example.com", ("videos.example.com", True)),
        ("http://localhost:8333/", ("localhost:8333", False)),
        ("videos.example.com", None),  # no scheme
        ("ftp://videos.example.com", None),
        ("https://videos.example.com/bucket", None),  # the bucket is ours to add
        ("https://user:pw@videos.example.com", None),
        ("https://:pw@videos.example.com", None),
        ("https://videos.example.com:http", None),
        ("https://videos.example.com#x", None),
        ("https://", None),
    ],
)
def test_s3_public_url_is_a_bare_http_origin(url, ok):
    from gateway.gateway import GatewaySettings
    from gateway.s3_storage import public_endpoint

    if ok:
        assert public_endpoint(url) == ok
        GatewaySettings(storage="s3", s3_endpoint="s3:9000", s3_public_url=url).validate()
    else:
        with pytest.raises(ValueError, match="s3_public_url"):
            GatewaySettings(storage="s3", s3_endpoint="s3:9000", s3_public_url=url).validate()


def test_stage_slots_resize_while_held():
    import threading

    from gateway.pipeline import Slots

    s = Slots(1)
    assert s.acquire(timeout=0) and not s.acquire(timeout=0.05)
    got = threading.Event()
    t = threading.Thread(target=lambda: s.acquire(timeout=5) and got.set())
    t.start()
    s.resize(2)  # a second replica came: the waiter gets in without anyone releasing
    assert got.wait(5)
    s.resize(1)  # and went: two are held, the limit is one; nobody new gets in until both release
    s.release()
    assert not s.acquire(timeout=0.05)
    s.release()
    assert s.acquire(timeout=0) and s.held == 1
    s.release()
    with pytest.raises(ValueError):
        s.release()
    t.join()
