"""Tiers (what a tenant's plan allows) and the per-tenant token-bucket rate limiter."""

from __future__ import annotations

import time
from dataclasses import dataclass


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


class RateLimiter:
    """The tier's token bucket per tenant, kept in the job store (JobStore.take_token), so every
    gateway on one database draws from the same bucket: N replicas do not give a tenant N times its
    rate. take() returns 0 when allowed, else seconds to wait. `clock` is wall time (buckets are
    shared between processes, so time.monotonic() would not do)."""

    def __init__(self, store, clock=time.time):
        self.store = store
        self.clock = clock

    def take(self, tenant: str, policy: TierPolicy, now: float | None = None) -> float:
        return self.store.take_token(tenant, policy.rate_per_minute / 60.0, policy.burst,
                                     self.clock() if now is None else now)  # fmt: skip
