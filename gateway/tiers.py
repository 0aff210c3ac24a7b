"""Tiers (what a tenant's plan allows) and the per-tenant token-bucket rate limiter."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TierPolicy:
    name: str
    priority: int  # lower runs first
    max_active: int  # queued + running jobs at once; more -> RESOURCE_EXHAUSTED
    max_running: int  # running at once (the scheduler holds the rest in the queue)
    daily_quota: int  # jobs per rolling 24 h
    rate_per_minute: float  # token-bucket refill
    burst: int  # token-bucket size
    # allowed output sizes of the default model; empty = every size the gateway offers
    sizes: tuple[str, ...] = ()
    max_duration: float = 0.0  # seconds; 0 = whatever the model offers
    # Limits any backend can apply (a size list cannot describe Wan's any-multiple-of-16 sizes):
    max_pixels: int = 0  # width x height of one delivered frame; 0 = no limit
    max_frames: int = 0  # frames the model generates per clip (VideoSpec.num_frames); 0 = no limit
    visible_watermark: bool = True
    # step caching for this tier's jobs when the request does not say (VideoSpec.step_cache); 0 = off
    step_cache: float = 0.0


DEFAULT_TIERS: dict[str, TierPolicy] = {
    "free": TierPolicy(
        "free",
        priority=10,
        max_active=20,
        max_running=1,
        daily_quota=100,
        rate_per_minute=30,
        burst=20,
        visible_watermark=True,
    ),  # fmt: skip
    "pro": TierPolicy(
        "pro",
        priority=0,
        max_active=200,
        max_running=4,
        daily_quota=5000,
        rate_per_minute=600,
        burst=200,
        visible_watermark=False,
    ),  # fmt: skip
    "enterprise": TierPolicy(
        "enterprise",
        priority=0,
        max_active=1000,
        max_running=16,
        daily_quota=100_000,
        rate_per_minute=6000,
        burst=1000,
        visible_watermark=False,
    ),  # fmt: skip
}


def tiers_from(table: dict | None) -> dict[str, TierPolicy]:
    """Defaults, overridden per tier by a config table {tier: {field: value}}."""
    out = dict(DEFAULT_TIERS)
    for name, fields in (table or {}).items():
        base = out.get(name, DEFAULT_TIERS["free"])
        kw = {**base.__dict__, **fields, "name": name}
        if "sizes" in fields:
            kw["sizes"] = tuple(fields["sizes"])
        policy = TierPolicy(**kw)
        if not 0 <= policy.step_cache <= 1:  # the denoiser's range (base.MAX_STEP_CACHE)
            raise ValueError(f"tiers.{name}.step_cache must be in 0..1 (0 = off); got {policy.step_cache}")
        out[name] = policy
    return out


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimiter:
    """One token bucket per tenant. take() returns 0 when allowed, else seconds to wait."""

    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, tenant: str, policy: TierPolicy, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        rate = policy.rate_per_minute / 60.0
        with self._lock:
            b = self._buckets.get(tenant)
            if b is None:
                b = self._buckets[tenant] = _Bucket(tokens=float(policy.burst), stamp=now)
            b.tokens = min(float(policy.burst), b.tokens + (now - b.stamp) * rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / rate if rate > 0 else 60.0
