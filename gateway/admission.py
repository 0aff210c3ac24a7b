"""Admission: what a request must pass before it is queued, in the order the gateway asks.

`screen` is the content policy (before anything is queued or reaches the encoder; a refusal is
audited and names the category, never the word); `admit` is the queue bound, the tier's rate limit,
the tenant's in-flight cap and the daily quota, each a RESOURCE_EXHAUSTED with a RetryInfo delay.
The gateway runs `admit` and the job's insert under one lock (gateway.py `create`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.jobs import JobStore
from gateway.metrics import METRICS
from gateway.safety import SafetyFilter
from gateway.scheduler import JobQueue
from gateway.tenants import Tenant
from gateway.tiers import RateLimiter, TierPolicy
from videomesh.errors import InvalidArgument, ResourceExhausted
from videomesh.v1 import common_pb2

if TYPE_CHECKING:
    from gateway.gateway import GatewaySettings

audit = logging.getLogger("videomesh.audit")


class Admission:
    def __init__(self, settings: GatewaySettings, store: JobStore, queue: JobQueue | None, safety: SafetyFilter,
                 limiter: RateLimiter | None = None):  # fmt: skip
        self.settings = settings
        self.store = store
        self.queue = queue
        self.safety = safety
        self.limiter = limiter or RateLimiter(store)  # the bucket lives in the store, shared by replicas
        self._audit_lock = threading.Lock()

    def screen(self, tenant: Tenant, spec: common_pb2.VideoSpec) -> None:
        """Content policy, before anything is queued or reaches the encoder; refusals are audited."""
        verdict = self.safety.check(spec.prompt, spec.negative_prompt, spec.style)
        if not verdict.blocked:
            return
        METRICS.rejected.labels(reason="CONTENT_POLICY").inc()
        self.store.add_blocked(tenant.name, verdict.category)
        import hashlib
        import json

        # the category, the matched list entry and a hash of the prompt: enough to review the policy and to
        # match a complaint about a given prompt, without keeping the user's text
        record = {"time": time.time(), "tenant": tenant.name, "category": verdict.category, "term": verdict.term,
                  "prompt_sha256": hashlib.sha256(spec.prompt.encode()).hexdigest(), "prompt_chars": len(spec.prompt)}  # fmt: skip
        line = json.dumps(record, ensure_ascii=False)
        with self._audit_lock, open(Path(self.settings.data_dir) / "audit.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")
        # the copy a cluster's log pipeline collects (audit.log is each pod's own)
        audit.warning("content policy refused a prompt: %s", line)
        raise InvalidArgument(
            f"the prompt was refused by the content policy ({verdict.category.replace('_', ' ')})",
            reason="CONTENT_POLICY",
            field="spec.prompt",
            metadata={"category": verdict.category},
        )

    def admit(self, tenant: Tenant, policy: TierPolicy, *, cache_hit: bool = False) -> None:
        """Queue bound, rate limit, per-tenant in-flight cap, daily quota: RESOURCE_EXHAUSTED + RetryInfo.
        A cache hit is checked against the rate limit and the quota only (it is never queued or active)."""
        if not cache_hit and self.queue.full():
            METRICS.rejected.labels(reason="QUEUE_FULL").inc()
            raise ResourceExhausted(f"the queue is full ({self.settings.queue_size} jobs); retry later", retry_after=5.0,
                                    reason="QUEUE_FULL")  # fmt: skip
        wait = self.limiter.take(tenant.name, policy)
        if wait > 0:
            METRICS.rejected.labels(reason="RATE_LIMITED").inc()
            raise ResourceExhausted(f"rate limit of the {policy.name} tier ({policy.rate_per_minute:g}/min) reached",
                                    retry_after=wait, reason="RATE_LIMITED")  # fmt: skip
        active = 0 if cache_hit else self.store.active_count(tenant.name)
        if active >= policy.max_active:
            METRICS.rejected.labels(reason="TOO_MANY_ACTIVE").inc()
            raise ResourceExhausted(f"{active} of your jobs are queued or running; the {policy.name} tier allows "
                                    f"{policy.max_active}", retry_after=10.0, reason="TOO_MANY_ACTIVE")  # fmt: skip
        since = time.time() - 86400
        n, oldest = self.store.count_since(tenant.name, since)
        if n >= policy.daily_quota:
            METRICS.rejected.labels(reason="QUOTA_EXCEEDED").inc()
            raise ResourceExhausted(f"daily quota of the {policy.name} tier ({policy.daily_quota} videos per 24 h) is used up",
                                    retry_after=max(1.0, (oldest or since) + 86400 - time.time()),
                                    reason="QUOTA_EXCEEDED")  # fmt: skip
