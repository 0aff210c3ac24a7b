"""The result cache: a repeated request (same normalised spec, seed, model and tenant-visible rendering)
is answered from the stored file of the job that made it, as a new job of its own that succeeds at once.

Keys come from the spec policy (gateway/policy.py `cache_key`); key -> job lives in the job store, so
every replica on one database shares the cache. A hit still counts against the tenant's rate limit and
quota (the gateway's admission says so); it takes no queue slot.
"""

from __future__ import annotations

import logging

from gateway.jobs import Job, JobStore, new_id, now_ts
from gateway.metrics import METRICS
from gateway.storage import Storage
from gateway.tenants import Tenant
from videomesh import tracing
from videomesh.errors import Unavailable
from videomesh.v1 import common_pb2, gateway_pb2

log = logging.getLogger("videomesh.gateway")


class ResultCache:
    def __init__(self, enabled: bool, store: JobStore, storage: Storage, spec, runner):
        self.enabled = enabled
        self.store = store
        self.storage = storage
        self.spec = spec  # gateway.policy.SpecPolicy
        self.runner = runner  # gateway.runner.JobRunner: terminal transitions

    def key(self, spec: common_pb2.VideoSpec, tenant: Tenant, template_id: str = "") -> str:
        return self.spec.cache_key(spec, tenant, template_id) if self.enabled else ""

    def source(self, key: str) -> Job | None:
        """The finished job whose file serves `key`, if it is still there (counted: hit or miss)."""
        if not key:
            return None
        src = self._source(key)
        METRICS.cache_lookups.labels("hit" if src is not None else "miss").inc()
        return src

    def _source(self, key: str) -> Job | None:
        src_id = self.store.cache_get(key)
        if src_id is None:
            return None
        src = self.store.load(src_id)
        if src.video.status != common_pb2.SUCCEEDED or src.video.deleted:
            self.store.cache_drop(src_id)
            return None
        return src

    def remember(self, job: Job, video: gateway_pb2.Video) -> None:
        """A job succeeded: it answers its key from now on."""
        if self.enabled:
            self.store.cache_put(
                self.key(video.spec, Tenant(job.tenant, job.tier), video.template_id), job.id
            )

    def forget(self, job_id: str) -> None:
        self.store.cache_drop(job_id)

    def serve(self, src: Job, key: str, tenant: Tenant, tier: str, spec: common_pb2.VideoSpec, request_id: str,
              webhook_url: str, regenerated_from: str, template_id: str) -> gateway_pb2.Video:  # fmt: skip
        """A new job for the hit, its file copied from the source's; SUCCEEDED at once (or FAILED
        UNAVAILABLE when the copy fails: never left QUEUED)."""
        video = gateway_pb2.Video(
            id=new_id(), status=common_pb2.QUEUED, stage=common_pb2.STAGE_QUEUED, spec=spec, create_time=now_ts(),
            update_time=now_ts(), regenerated_from=regenerated_from, model=src.video.model, template_id=template_id,
            watermark=src.video.watermark, cached=True,  # the bytes are the cached file's, so is the mark
            warnings=src.video.warnings,
        )  # fmt: skip
        video.trace_id, video.trace_parent = tracing.current_ids()
        job = Job(
            id=video.id,
            tenant=tenant.name,
            video=video,
            request_id=request_id,
            tier=tier,
            webhook=webhook_url,
        )
        self.store.create(job, gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=0)))
        try:
            stored = self.storage.copy(f"{src.tenant}/{src.id}.mp4", f"{tenant.name}/{job.id}.mp4")
        except Exception as err:  # noqa: BLE001 - any failure of the copy fails this job, never leaves it QUEUED
            log.warning("cached result %s could not be copied: %s", src.id, err)
            self.store.cache_drop(src.id)
            self.runner.fail(job.id, Unavailable("the cached result could not be copied; submit again"))
            return self.store.snapshot(job.id)

        def done(v):
            v.status = common_pb2.SUCCEEDED
            v.stage = common_pb2.STAGE_DONE
            v.progress = 100.0
            v.result.CopyFrom(src.video.result)
            v.result.uri, v.result.url = stored.uri, stored.url
            v.quality.CopyFrom(src.video.quality)

        final = self.store.finish(job.id, done, gateway_pb2.VideoEvent(completed=gateway_pb2.Completed()))
        self.store.cache_put(key, job.id)  # the newest copy serves the next hit
        METRICS.jobs.labels(status="CACHE_HIT", tier=job.tier).inc()
        self.runner.terminal(job, final)
        return final
