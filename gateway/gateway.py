"""The gateway's domain object: the public operations over its parts.

The parts, each in its own module: the spec policy (gateway/policy.py: normalise, validate and plan a
request), admission (gateway/admission.py: content screen, rate limits, caps, quotas), the result cache
(gateway/result_cache.py), and the runner (gateway/runner.py: workers, attempts, QC regeneration,
retries, terminal transitions, leases). The gRPC servicer is a thin layer over this class.

Durable: jobs and their events live in the JobStore. SQLite (the default) for one gateway: on start-up
queued jobs are queued again and jobs that were running re-run (attempt + 1) under the same object
key. PostgreSQL (`database = "postgresql://…"`) for several replicas: the queue is in the database,
each running job is held by a lease, and a replica that dies has its jobs re-run by the others once
their leases expire, under the same key; fencing keeps a late result from landing twice.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.admission import Admission
from gateway.jobs import ENDED, TERMINAL, Job, JobStore, is_postgres, new_id, now_ts
from gateway.metrics import METRICS
from gateway.pipeline import Downstreams, Pipeline, Plan
from gateway.policy import MOTION_WORDS, STILL_WORDS, ModelRules, SpecPolicy, _size, expects_motion  # noqa: F401
from gateway.result_cache import ResultCache
from gateway.rules import rule_driven
from gateway.runner import JobRunner
from gateway.safety import SafetyFilter
from gateway.sqlite_store import SQLiteJobStore
from gateway.storage import LocalStorage, Storage
from gateway.templates import TemplateLibrary
from gateway.tenants import Tenant
from gateway.tiers import RateLimiter, TierPolicy, tiers_from
from gateway.watermark import InvisibleWatermark, VisibleMark, payload_for
from gateway.webhooks import WebhookRefused, WebhookSender, check_request_url
from gateway.webhooks import check_allow_entries as check_webhook_allow
from videomesh import tracing
from videomesh.codec import TEXT_MESSAGE_BYTES
from videomesh.errors import FailedPrecondition, InvalidArgument, VideomeshError
from videomesh.meshauth import MeshSecrets
from videomesh.v1 import common_pb2, denoiser_pb2, gateway_pb2

log = logging.getLogger("videomesh.gateway")


@dataclass(frozen=True)
class GatewaySettings:
    encoder: str = "127.0.0.1:50051"
    denoiser: str = "127.0.0.1:50052"
    upscaler: str = "127.0.0.1:50053"
    qc: str = "127.0.0.1:50054"
    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path = Path("videomesh-data")
    # Where jobs, events, the cache, the queue (several replicas) and rate-limit buckets live: empty =
    # SQLite at data_dir/jobs.sqlite3 (one gateway, zero set-up); a path = SQLite there;
    # postgresql://user:pass@host/db = PostgreSQL, shared by any number of gateway replicas. Prefer
    # VIDEOMESH_GATEWAY_DATABASE (it may hold a password) to a config file.
    database: str = ""
    lease_seconds: float = 30.0  # PostgreSQL: a replica that stops renewing for this long loses its jobs
    database_pool: int = 16  # PostgreSQL connections per replica
    database_timeout: float = 5.0  # PostgreSQL: a call waits this long for a connection, then UNAVAILABLE
    # PostgreSQL with storage=local: every replica must see the same directory (one machine, or a shared
    # mount); say so here. S3 is the normal case for several machines.
    shared_storage: bool = False
    # jobs in the pipeline at once (0 = the denoiser's capacity + 1, so one job encodes or finishes while
    # a full batch denoises); stage slots keep each downstream within its capacity
    workers: int = 0
    queue_size: int = 256
    aging_seconds: float = 30.0  # a free job gains one priority level per this many seconds waited
    sizes: tuple[str, ...] = ("256x256", "128x128", "512x512")
    default_size: str = "256x256"
    fps_choices: tuple[float, ...] = (24.0, 12.0, 8.0)
    default_fps: float = 24.0
    # sizes, fps_choices and default_* above are the default model's (frames raised by the upscaler). A
    # backend that publishes its own rules (wan2.2) is validated by them (gateway/rules.py); its clips
    # come at its native rate or, interpolated by the upscaler, at one of these:
    interpolated_fps: tuple[float, ...] = (24.0,)
    # the largest message on the channels to the encoder and the denoiser: Wan's text states for a
    # prompt and its negative are 2 x 512 x 4096 bf16 = 8 MiB (codec.TEXT_MESSAGE_BYTES)
    text_message_bytes: int = TEXT_MESSAGE_BYTES
    qc_policy: str = "review"  # review: failed QC -> new seed(s), then NEEDS_REVIEW; off: do not gate
    qc_regenerations: int = 1  # new seeds to try when QC fails, before NEEDS_REVIEW
    retries: int = 4  # gRPC-level retries of UNAVAILABLE per call (channel retry policy)
    max_attempts: int = 3  # job-level attempts for retryable failures (downstream down, rate-limited)
    retry_backoff: float = 1.0  # seconds before the 2nd attempt; doubles after
    breaker_threshold: int = 3
    breaker_cooldown: float = 10.0
    job_timeout: float = 900.0  # upper bound on one attempt's wall time
    model_wait_timeout: float = 1800.0  # at start-up, the wait for the denoiser's model (Wan: minutes)
    stall_timeout: float = (
        120.0  # a stage that sends nothing for this long is stopped; the attempt is retried
    )
    encode_timeout: float = 60.0  # bound on one Encode call (within the job's budget)
    storage: str = "local"  # local (data_dir/videos) | s3
    s3_endpoint: str = ""  # host:port
    s3_access_key: str = ""
    s3_secret_key: str = ""  # prefer VIDEOMESH_GATEWAY_S3_SECRET_KEY over a file
    s3_bucket: str = "videomesh"
    s3_secure: bool = False
    # where users download from, when that is not s3_endpoint (an ingress or proxy in front of the store that
    # keeps the Host header): links are signed for this http(s)://host[:port]; empty = s3_endpoint
    s3_public_url: str = ""
    s3_region: str = ""  # empty: asked of the store (links for s3_public_url: us-east-1); set it for AWS
    url_expiry_seconds: float = 3600.0  # presigned links expire after this
    templates_file: Path | None = None  # default gateway/templates.toml
    pregenerate_templates: bool = (
        False  # render each `pregenerated` template's defaults into the cache at start-up
    )
    cache: bool = (
        True  # serve a repeated request (same normalised spec, seed and model) from the stored result
    )
    model_refresh_seconds: float = (
        5.0  # re-read the denoiser's ModelInfo (new style adapters) at most this often
    )
    retention_seconds: float = 0.0  # delete stored files older than this (0 = keep)
    safety_lists: Path | None = None  # TOML of blocked terms per category; default gateway/safety_terms.toml
    invisible_watermark: bool = True
    visible_watermark: bool = True  # where the tenant's tier asks for it
    watermark_text: str = "videomesh"
    watermark_position: str = "bottom-right"
    watermark_opacity: float = 0.45
    watermark_key: str = "videomesh"  # keys the invisible mark's layout; keep it secret per deployment
    stage_slots: tuple[int, ...] = ()  # encode, denoise, upscale, qc; empty = from the denoiser's capacity
    # re-count the SERVING denoiser replicas and the gateway replicas sharing them (PostgreSQL) this often:
    # workers and stage slots (where they come from the denoiser's capacity) follow this gateway's share;
    # 0 = count once, at start-up (and the other gateways stop counting this one after 3 periods of theirs)
    capacity_refresh_seconds: float = 10.0
    tiers: dict = field(default_factory=dict)  # per-tier overrides of gateway.tiers.DEFAULT_TIERS
    webhook_attempts: int = 5
    webhook_backoff: float = 0.5
    metrics_port: int = -1  # Prometheus /metrics on host:port; -1 = off, 0 = a free port
    # TLS on the public port: PEM files of the certificate chain and its private key (both or neither);
    # `videomesh up --tls-self-signed` makes a pair for a local trial
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # grpc.health.v1 alone, in plaintext, on host:health_port (-1 = off): for probes that cannot speak the
    # public port's TLS (the kubelet's native gRPC probe); it tells a status and nothing else
    health_port: int = -1
    # Webhook URLs a request may name besides its tenant's registered one: URL prefixes
    # (https://hooks.example.com/videomesh) or host patterns (hooks.example.com, *.example.com, *).
    webhook_allow: tuple[str, ...] = ()
    webhook_allow_private: bool = False  # let webhooks reach loopback/private addresses (local trials only)
    # Open WatchVideo + GenerateVideo streams: per tenant, and in all (kept below the server's
    # 32 worker threads so unary calls and health checks always find one).
    max_streams_per_tenant: int = 8
    max_streams: int = 24

    @property
    def postgres(self) -> bool:
        return is_postgres(self.database)

    def validate(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: set both (TLS on the public port) or neither")
        for what, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{what}: {path} is not a readable file")
        for s in self.sizes:
            w, _, h = s.partition("x")
            if not (w.isdigit() and h.isdigit()) or int(w) % 2 or int(h) % 2:
                raise ValueError(f"sizes: {s!r} must be WIDTHxHEIGHT with even sides")
        if self.default_size not in self.sizes:
            raise ValueError(f"default_size {self.default_size!r} is not in sizes {self.sizes}")
        if self.default_fps not in self.fps_choices:
            raise ValueError(f"default_fps {self.default_fps} is not in fps_choices {self.fps_choices}")
        if self.postgres and self.storage == "local" and not self.shared_storage:
            raise ValueError(
                "database is PostgreSQL (several replicas) but storage is local: each replica would keep its own "
                "files. Use storage=s3, or set shared_storage=true (VIDEOMESH_GATEWAY_SHARED_STORAGE) if every "
                "replica sees the same data_dir (one machine, or a shared mount)"
            )
        if not self.lease_seconds >= 0.5 or self.database_pool < 2 or not self.database_timeout > 0:
            raise ValueError(
                "lease_seconds must be at least 0.5, database_pool at least 2, database_timeout > 0"
            )
        if self.storage not in ("local", "s3"):
            raise ValueError(f"storage must be local or s3; got {self.storage!r}")
        if self.storage == "s3" and not self.s3_endpoint:
            raise ValueError("storage=s3 needs s3_endpoint (VIDEOMESH_GATEWAY_S3_ENDPOINT)")
        if self.s3_public_url:
            from gateway.s3_storage import public_endpoint

            public_endpoint(self.s3_public_url)  # ValueError naming the field
        if self.qc_policy not in ("review", "off"):
            raise ValueError(f"qc_policy must be review or off; got {self.qc_policy!r}")
        if self.workers < 0 or self.queue_size < 1 or self.max_attempts < 1:
            raise ValueError(
                "workers must be 0 (from the denoiser's capacity) or more; queue_size and "
                "max_attempts at least 1"
            )
        if not 1 <= self.max_streams_per_tenant <= self.max_streams:
            raise ValueError("max_streams_per_tenant must be in 1..max_streams")
        check_webhook_allow(self.webhook_allow)
        if any(not (math.isfinite(f) and 0 < f <= 120) for f in self.interpolated_fps):
            raise ValueError(f"interpolated_fps must be in (0, 120]; got {self.interpolated_fps}")
        if self.text_message_bytes < 4 * 1024 * 1024:
            raise ValueError(f"text_message_bytes must be at least 4 MiB; got {self.text_message_bytes}")
        for t in tiers_from(self.tiers).values():
            if t.max_pixels < 0 or t.max_frames < 0:
                raise ValueError(
                    f"tier {t.name!r}: max_pixels and max_frames must be 0 (no limit) or positive"
                )
            extra = set(t.sizes) - set(self.sizes)
            if extra:
                raise ValueError(
                    f"tier {t.name!r} allows sizes {sorted(extra)} that the gateway does not offer ({self.sizes})"
                )


class VideoGateway:
    def __init__(self, settings: GatewaySettings, *, store: JobStore | None = None, storage: Storage | None = None,
                 tenants=None):  # fmt: skip
        self.settings = settings
        self.store = store or open_store(settings)
        self.storage = storage or _storage(settings)
        self.tenants = tenants
        self.tiers: dict[str, TierPolicy] = tiers_from(settings.tiers)
        self.downstreams = Downstreams(settings.encoder, settings.denoiser, settings.upscaler, settings.qc, settings.retries,
                                       breaker_threshold=settings.breaker_threshold,
                                       breaker_cooldown=settings.breaker_cooldown,
                                       text_message_bytes=settings.text_message_bytes,
                                       mesh=MeshSecrets.from_env())  # fmt: skip
        self.pipeline: Pipeline | None = None
        # the denoiser's published rules and the spec policy built on them (gateway/policy.py)
        self.rules = ModelRules(
            lambda: self.downstreams.denoiser.GetModelInfo(denoiser_pb2.GetModelInfoRequest(), timeout=5),
            settings.model_refresh_seconds,
        )
        # in this process (SQLite), or in the database shared by the replicas with leases (PostgreSQL)
        self.queue = self.store.queue(settings.queue_size, settings.aging_seconds, settings.lease_seconds)
        self.limiter = RateLimiter(self.store)
        self.webhooks = WebhookSender(attempts=settings.webhook_attempts, backoff=settings.webhook_backoff,
                                      allow_private=settings.webhook_allow_private)  # fmt: skip
        self._stopping = threading.Event()
        self.workers = settings.workers  # resolved from the denoiser's capacity at load() when 0
        self.replicas = 1  # denoiser replicas SERVING, counted at load() and every capacity_refresh_seconds
        self.gateways = 1  # gateway replicas sharing them (PostgreSQL), counted alongside
        self.recovered = threading.Event()  # set once the jobs of a previous run are queued again
        self.safety = SafetyFilter.load(settings.safety_lists)
        self.templates = TemplateLibrary.load(settings.templates_file)
        self.spec = SpecPolicy(settings, self.tiers, self.templates, self.rules)
        self.admission = Admission(settings, self.store, self.queue, self.safety, self.limiter)
        self.runner = JobRunner(self)
        self.cache = ResultCache(settings.cache, self.store, self.storage, self.spec, self.runner)

    @property
    def model(self) -> denoiser_pb2.ModelInfo | None:
        """The denoiser's ModelInfo (None until load() read it)."""
        return self.rules.info

    @model.setter
    def model(self, info: denoiser_pb2.ModelInfo | None) -> None:
        self.rules.set(info)

    # --- the spec policy (gateway/policy.py), as the gateway's own operations and tests call it ---
    def normalize(self, spec: common_pb2.VideoSpec, policy: TierPolicy | None = None,
                  tenant: str = "") -> common_pb2.VideoSpec:  # fmt: skip
        return self.spec.normalize(spec, policy, tenant)

    def adapters_for(self, tenant: str) -> list[common_pb2.AdapterInfo]:
        return self.spec.adapters_for(tenant)

    def plan(self, spec: common_pb2.VideoSpec, watermark: str = "", visible: bool = False) -> Plan:
        return self.spec.plan(spec, watermark, visible)

    def cache_key(self, spec: common_pb2.VideoSpec, tenant: Tenant, template_id: str = "") -> str:
        return self.spec.cache_key(spec, tenant, template_id)

    # --- lifecycle ----------------------------------------------------------------------------
    def _review_backlog(self) -> float:
        """NEEDS_REVIEW jobs of every tenant, read at each scrape (NaN while the store is unreachable)."""
        try:
            return float(self.store.count_status(common_pb2.NEEDS_REVIEW))
        except Exception:  # noqa: BLE001 - the store down or closed: a scrape must still answer
            return float("nan")

    def load(self, timeout: float | None = None) -> None:
        """Wait for the denoiser, learn what it supports, recover jobs, start the workers."""
        deadline = time.monotonic() + (self.settings.model_wait_timeout if timeout is None else timeout)
        while True:
            try:
                self.model = self.downstreams.denoiser.GetModelInfo(denoiser_pb2.GetModelInfoRequest(), timeout=5,
                                                                    wait_for_ready=True)  # fmt: skip
                break
            except grpc.RpcError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"denoiser at {self.settings.denoiser} not reachable: {err.details()}"
                    ) from err
                time.sleep(0.5)
        s = self.settings
        self.replicas = max(1, self.downstreams.serving_replicas("denoiser"))
        self.gateways = self._peers()
        cap, slots, self.workers = self._sizes(self.replicas, self.gateways)
        self.pipeline = Pipeline(self.downstreams, self.storage, Path(s.data_dir) / "work", slots=slots,
                                 invisible=InvisibleWatermark(s.watermark_key),
                                 visible=VisibleMark(s.watermark_text, s.watermark_position, s.watermark_opacity),
                                 encode_timeout=s.encode_timeout)  # fmt: skip
        METRICS.review_backlog.set_function(self._review_backlog)
        if self.settings.retention_seconds > 0:
            threading.Thread(target=self._janitor, name="retention", daemon=True).start()
        if self.settings.pregenerate_templates:
            self._pregenerate()
        log.info("denoiser capacity %d (%d replica(s) SERVING), this gateway's share of %d: %d job workers, "
                 "stage slots %s; job store %s", cap, self.replicas, self.gateways, self.workers, slots,
                 "PostgreSQL (shared queue, leases)" if self.queue.leased else "SQLite")  # fmt: skip
        self.runner.start(self.workers)
        METRICS.denoiser_replicas.set(self.replicas)
        METRICS.job_workers.set(self.workers)
        if s.capacity_refresh_seconds > 0:  # also with fixed sizes: the other gateways count this one
            threading.Thread(target=self._follow_replicas, name="capacity", daemon=True).start()

    def _peers(self) -> int:
        """The gateway replicas sharing the queue (PostgreSQL: those alive lately, this one included)."""
        try:
            return max(1, self.queue.peers(max(1.0, self.settings.capacity_refresh_seconds)))
        except VideomeshError as err:  # the database blipped: keep the last count
            log.warning("counting gateway replicas: %s", err.message)
            return self.gateways

    def _sizes(self, replicas: int, gateways: int = 1) -> tuple[int, tuple[int, ...], int]:
        """-> (this gateway's share of the denoisers' capacity, stage slots, job workers) for `replicas`
        SERVING denoiser replicas, each taking `capacity` requests at once (its ModelInfo; round_robin
        spreads the calls over them), shared by `gateways` replicas of the gateway (rounded up: at least 1)."""
        cap = -(-max(1, self.model.capacity or 1) * replicas // max(1, gateways))
        slots = self.settings.stage_slots or (4 * cap, cap, 2 * cap, 4 * cap)
        return cap, slots, self.settings.workers or cap + 1

    def _follow_replicas(self) -> None:
        """Workers and stage slots follow the number of SERVING denoiser replicas (an HPA or KubeRay adding
        pods behind a headless Service) and of gateway replicas sharing them. None SERVING keeps the last
        sizes: that is an outage, which the breakers and retries handle, not a reason to stop taking work."""
        while not self._stopping.wait(self.settings.capacity_refresh_seconds):
            try:
                n = self.downstreams.serving_replicas("denoiser")
            except Exception as err:  # noqa: BLE001 - a resolver hiccup: try again next period
                log.warning("counting denoiser replicas: %s", err)
                continue
            n = n if n >= 1 else self.replicas
            g = self._peers()
            if (n, g) == (self.replicas, self.gateways) or self._stopping.is_set():
                continue
            cap, slots, workers = self._sizes(n, g)
            log.info("denoiser replicas SERVING: %d -> %d, gateways: %d -> %d; this gateway's share %d: "
                     "%d job workers, stage slots %s", self.replicas, n, self.gateways, g, cap, workers, slots)  # fmt: skip
            self.replicas, self.gateways, self.workers = n, g, workers
            self.pipeline.resize(slots)
            self.runner.resize(workers)
            METRICS.denoiser_replicas.set(n)
            METRICS.job_workers.set(workers)

    def wedged(self) -> bool:
        return self.runner.wedged()

    def drain(self, grace: float) -> None:
        """SIGTERM: claim no more jobs; those running get `grace` seconds to finish before close() stops
        them (a replica on PostgreSQL hands them back at once; SQLite re-runs them at the next start)."""
        t0 = time.monotonic()
        left = self.runner.drain(grace)
        if left:
            log.warning("drain: %d job(s) still running after %.0f s, handed back: %s", len(left), grace,
                        ", ".join(left))  # fmt: skip
        else:
            log.info("drain: no job in flight (%.1f s)", time.monotonic() - t0)

    def close(self) -> None:
        self._stopping.set()
        self.runner.close()
        self.webhooks.close()
        self.downstreams.close()

    # --- spec ---------------------------------------------------------------------------------
    def verify_watermark(self, tenant: Tenant, chunks) -> gateway_pb2.VerifyWatermarkResponse:
        """Decode the invisible mark of an uploaded video; name the caller's video that carries it.

        Bounded for hostile uploads: frames larger than the largest size this gateway makes are
        refused before decoding (none of its videos is larger, so none could carry its mark), and
        at most MAX_VERIFY_FRAMES frames are decoded (`frames` in the reply counts them)."""
        import tempfile

        from gateway.media import MAX_VERIFY_FRAMES, iter_frames

        offered = [_size(s) for s in self.settings.sizes]
        max_size = (max(w for w, _ in offered), max(h for _, h in offered))
        if self.model is not None and rule_driven(self.model):  # any size the backend's rule allows
            r = self.model.size_rule
            side = max([r.max_side, *(max(z.width, z.height) for z in r.official)])
            max_size = (side, side)

        work = Path(self.settings.data_dir) / "work"
        work.mkdir(parents=True, exist_ok=True)
        size = 0
        with tempfile.NamedTemporaryFile(suffix=".mp4", dir=work) as f:
            for chunk in chunks:
                size += len(chunk)
                if size > 512 * 1024 * 1024:
                    raise InvalidArgument("video larger than 512 MiB", field="chunk")
                f.write(chunk)
            f.flush()
            if size == 0:
                raise InvalidArgument("no video bytes received", field="chunk")
            frames = 0

            def counted():
                nonlocal frames
                decoded = iter_frames(
                    Path(f.name), max_frames=MAX_VERIFY_FRAMES, max_size=max_size, field="chunk"
                )
                for fr in decoded:
                    frames += 1
                    yield fr

            payload, confidence, ok = self.pipeline.invisible.extract(counted())
        if frames == 0:
            raise InvalidArgument("could not decode any frame: is this a video file?", field="chunk")
        job = self.store.by_watermark(tenant.name, payload) if ok else None
        return gateway_pb2.VerifyWatermarkResponse(present=ok, payload=payload if ok else "", confidence=confidence,
                                                   video_id=job.id if job else "", frames=frames)  # fmt: skip

    def download(
        self, tenant: str, video_id: str, chunk: int = 1 << 20
    ) -> Iterator[gateway_pb2.DownloadVideoResponse]:
        """The finished file's bytes, then a trailer with the size and SHA-256 of what was sent."""
        import hashlib

        video = self.store.get(tenant, video_id).video  # NotFound for another tenant's video
        if video.status not in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW):
            raise FailedPrecondition(f"video {video_id} is {common_pb2.VideoStatus.Name(video.status)}; only a "
                                     "finished video can be downloaded", reason="NOT_FINISHED")  # fmt: skip
        if video.deleted:
            raise FailedPrecondition(f"video {video_id}'s file was deleted", reason="DELETED")
        sha, size = hashlib.sha256(), 0
        for block in self.storage.read(f"{tenant}/{video_id}.mp4", chunk):
            sha.update(block)
            size += len(block)
            yield gateway_pb2.DownloadVideoResponse(chunk=block)
        yield gateway_pb2.DownloadVideoResponse(trailer=gateway_pb2.DownloadTrailer(
            size_bytes=size, sha256=sha.hexdigest(), content_type=video.result.content_type or "video/mp4"))  # fmt: skip

    def policy(self, tier: str) -> TierPolicy:
        return self.spec.policy(tier)

    # --- public operations ----------------------------------------------------------------------
    def create(self, tenant: Tenant, spec: common_pb2.VideoSpec, request_id: str = "", *, webhook_url: str = "",
               regenerated_from: str = "", template_id: str = "") -> gateway_pb2.Video:  # fmt: skip
        policy = self.policy(tenant.tier)
        if len(request_id) > 128:
            raise InvalidArgument("request_id is longer than 128 characters", field="request_id")
        if webhook_url:  # only the tenant's registered URL or the operator's allow-list; public targets
            try:
                check_request_url(webhook_url, registered=tenant.webhook_url, allow=self.settings.webhook_allow,
                                  allow_private=self.settings.webhook_allow_private)  # fmt: skip
            except WebhookRefused as err:
                raise InvalidArgument(str(err), field="webhook_url", reason="WEBHOOK_NOT_ALLOWED") from None
        if request_id:  # an idempotent replay returns the original job, whatever the limits say now
            found = self.store.by_request(tenant.name, request_id)
            if found is not None:
                return self.get(tenant.name, found.id)
        norm = self.normalize(spec, policy, tenant.name)
        self.admission.screen(tenant, norm)
        # admission checks + insert are one step per tenant, across every gateway on the store
        with self.store.tenant_lock(tenant.name):
            key = self.cache.key(norm, tenant, template_id)
            source = self.cache.source(key)
            # rate limits and quotas apply to every accepted request, cache hits included (a hit
            # takes no queue slot and is never "active", so those two checks are skipped for it)
            self.admission.admit(tenant, policy, cache_hit=source is not None)
            if source is not None:
                return self.cache.serve(source, key, tenant, policy.name, norm, request_id, webhook_url,
                                        regenerated_from, template_id)  # fmt: skip
            video = gateway_pb2.Video(
                id=new_id(), status=common_pb2.QUEUED, stage=common_pb2.STAGE_QUEUED, spec=norm, create_time=now_ts(),
                update_time=now_ts(), regenerated_from=regenerated_from, model=f"{self.model.name}@{self.model.version}",
            )  # fmt: skip
            video.watermark = payload_for(video.id)
            video.template_id = template_id
            # the request's trace (CreateVideo's span): the job's attempts join it
            video.trace_id, video.trace_parent = tracing.current_ids()
            job = Job(id=video.id, tenant=tenant.name, video=video, request_id=request_id, tier=policy.name,
                      webhook=webhook_url)  # fmt: skip
            video.queue_position = len(self.queue) + 1
            # the job, its queued event (always event 1) and, where the store keeps the queue, its queue entry
            # are one transaction: a database that fails half-way leaves no job that a client was refused
            first = gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=video.queue_position))
            stored = self.store.create(job, first, enqueue=(policy.priority, policy.max_running))
            if stored.id != job.id:
                return self.store.snapshot(stored.id)
            if not self.queue.leased:  # one gateway's queue is in this process
                self.queue.push(job.id, tenant.name, policy.priority, policy.max_running, force=True)
        METRICS.jobs.labels(status="QUEUED", tier=policy.name).inc()
        # the job is in, and `video` is what was stored: no second read (nor a database hiccup after the
        # commit) stands between the client and its acceptance; the depth was counted under the lock
        METRICS.queue_depth.set(video.queue_position)
        return video

    # --- cache, templates, feedback, usage, deletion --------------------------------------------------
    def create_from_template(self, tenant: Tenant, template_id: str, fields: dict, overrides: common_pb2.VideoSpec,
                             request_id: str = "") -> gateway_pb2.Video:  # fmt: skip
        t = self.templates.get(template_id)
        spec = common_pb2.VideoSpec()
        spec.CopyFrom(overrides)
        spec.prompt = t.render(dict(fields))
        spec.style = overrides.style or t.style
        if not overrides.HasField("seed"):
            spec.seed = self._template_seed(
                t.id
            )  # a fixed seed: the same fields come back instantly from the cache
        return self.create(tenant, spec, request_id, template_id=t.id)

    @staticmethod
    def _template_seed(template_id: str) -> int:
        import zlib

        return zlib.crc32(template_id.encode()) % (2**31 - 1) + 1

    def _pregenerate(self) -> None:
        """Queue each pregenerated template's default rendering (as the system tenant), so it is cached."""
        system = Tenant("system", "enterprise")
        for t in self.templates.templates.values():
            if t.pregenerated:
                try:
                    self.create_from_template(
                        system, t.id, {}, common_pb2.VideoSpec(), request_id=f"pregen:{t.id}"
                    )
                except VideomeshError as err:
                    log.warning("could not pre-generate template %s: %s", t.id, err.message)

    def feedback(self, tenant: Tenant, video_id: str, rating: int, reason: str) -> str:
        job = self.store.get(tenant.name, video_id)
        if not 1 <= rating <= 5:
            raise InvalidArgument(f"rating must be 1..5; got {rating}", field="rating")
        if len(reason) > 2000:
            raise InvalidArgument("reason is longer than 2000 characters", field="reason")
        fid = "fb_" + new_id()[4:]
        self.store.add_feedback(fid, tenant.name, job.id, rating, reason)
        return fid

    def usage(self, tenant: Tenant, since: float = 0.0) -> gateway_pb2.Usage:
        out = gateway_pb2.Usage(tenant=tenant.name)
        for job in self.store.tenant_jobs(tenant.name, since):
            v = job.video
            name = common_pb2.VideoStatus.Name(v.status)
            out.jobs[name] = out.jobs.get(name, 0) + 1
            if v.status == common_pb2.SUCCEEDED:
                out.output_seconds += v.result.duration_seconds
            if v.cached:
                out.cache_hits += 1
            for stage, secs in v.stage_seconds.items():
                out.compute_seconds[stage] = out.compute_seconds.get(stage, 0.0) + secs
        out.blocked_prompts = self.store.count_blocked(tenant.name, since)
        return out

    def delete(self, tenant: Tenant, video_id: str) -> gateway_pb2.Video:
        job = self.store.get(tenant.name, video_id)
        if job.video.status in (common_pb2.QUEUED, common_pb2.RUNNING):
            raise FailedPrecondition(
                f"video {video_id} is still {common_pb2.VideoStatus.Name(job.video.status)}; cancel it first"
            )
        return self._delete_file(job)

    def _delete_file(self, job: Job) -> gateway_pb2.Video:
        self.storage.delete(f"{job.tenant}/{job.id}.mp4")
        self.cache.forget(job.id)

        def mut(v):
            v.deleted = True
            v.result.uri = ""
            v.result.url = ""

        return self.store.update(job.id, mut)

    def _janitor(self) -> None:
        period = max(1.0, min(3600.0, self.settings.retention_seconds / 4))
        while not self._stopping.wait(period):
            for job in self.store.finished_before(time.time() - self.settings.retention_seconds):
                if not job.video.deleted:
                    log.info("retention: deleting %s", job.id)
                    self._delete_file(job)

    def get(self, tenant: str, video_id: str) -> gateway_pb2.Video:
        video = self.store.snapshot(self.store.get(tenant, video_id).id)
        if video.status == common_pb2.QUEUED:
            video.queue_position = self.queue.position(video_id) or video.queue_position
        if video.result.uri and not video.deleted:
            video.result.url = self.storage.url(
                f"{tenant}/{video_id}.mp4"
            )  # links expire: a fresh one per Get
        return video

    def list(self, tenant: str, *, page_size: int = 20, page_token: str = "", status: int = 0):
        if page_size < 0 or page_size > 100:
            raise InvalidArgument("page_size must be in 0..100", field="page_size")
        size = page_size or 20
        try:
            # tokens are offsets this server issued: ASCII digits that fit SQLite's int64, not
            # "9223372036854775808" (an OverflowError in the driver), "+1", "1_0" or "١"
            if page_token and not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 12):
                raise ValueError
            offset = int(page_token or 0)
            if offset < 0:
                raise ValueError
        except ValueError:
            raise InvalidArgument("page_token is not one this server issued", field="page_token") from None
        jobs = self.store.list(tenant, status=status, limit=size + 1, offset=offset)
        nxt = str(offset + size) if len(jobs) > size else ""
        return [j.video for j in jobs[:size]], nxt

    def cancel(self, tenant: str, video_id: str) -> gateway_pb2.Video:
        job = self.store.get(tenant, video_id)
        status = job.video.status
        if status in TERMINAL or status == common_pb2.NEEDS_REVIEW:
            raise FailedPrecondition(
                f"video {video_id} is already {common_pb2.VideoStatus.Name(status)}; only queued or running jobs can be cancelled"
            )
        self._cancel(video_id, "cancelled by request")
        return self.get(tenant, video_id)

    def _cancel(self, video_id: str, why: str) -> None:
        """Durable at once: the job is CANCELLED in the store before its work is stopped, so neither
        a worker that is just starting it nor a restart after a crash can run it again."""
        self.queue.remove(video_id)
        self.runner.finish_cancelled(video_id, why)
        # the attempt stops here if it runs on this replica; on another, its lease thread sees the status
        self.runner.cancel_local(video_id, why)

    def cancel_quietly(self, video_id: str, reason: str) -> None:
        """Cancel from inside the server (a GenerateVideo stream that ended early)."""
        self._cancel(video_id, reason)

    def wait_terminal(self, tenant: str, video_id: str, timeout: float) -> gateway_pb2.Video:
        deadline = time.monotonic() + timeout
        deque(self.events(tenant, video_id, 0, lambda: time.monotonic() < deadline), maxlen=0)
        return self.get(tenant, video_id)

    def regenerate(
        self, tenant: Tenant, video_id: str, seed: int | None, request_id: str
    ) -> gateway_pb2.Video:
        old = self.store.get(tenant.name, video_id).video
        spec = common_pb2.VideoSpec()
        spec.CopyFrom(old.spec)
        if seed is None:
            spec.seed = old.spec.seed
            while spec.seed == old.spec.seed:
                spec.seed = random.randrange(1, 2**31)
        else:
            spec.seed = seed
        return self.create(tenant, spec, request_id, regenerated_from=video_id)

    def review(self, tenant: Tenant, video_id: str, approve: bool, note: str) -> gateway_pb2.Video:
        """A reviewer's decision on a video the quality gate held back."""
        job = self.store.get(tenant.name, video_id)
        if len(note) > 2000:
            raise InvalidArgument("note is longer than 2000 characters", field="note")

        def decide(v):
            if v.status != common_pb2.NEEDS_REVIEW:
                raise FailedPrecondition(
                    f"video {video_id} is {common_pb2.VideoStatus.Name(v.status)}, not NEEDS_REVIEW"
                )
            v.review_note = note
            if approve:
                v.status = common_pb2.SUCCEEDED
            else:
                v.status = common_pb2.FAILED
                v.error.CopyFrom(gateway_pb2.VideoError(code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                                        message=note or "rejected in review", reason="REJECTED_IN_REVIEW"))  # fmt: skip

        video = self.store.update(job.id, decide)
        self.runner.terminal(job, video)
        return video

    def events(self, tenant: str, video_id: str, after: int, is_active) -> Iterator[gateway_pb2.VideoEvent]:
        """Yield events after `after` until (and including) the terminal one.

        Ends at once when the job has ended and nothing after `after` exists (a client resuming at
        or past the last event): the terminal event is written with the terminal status in one step
        (JobStore.finish), so once the status says ended no newer event can come."""
        self.store.get(tenant, video_id)  # NotFound for other tenants
        after = max(0, after)
        idle = True  # look at the status first, and again whenever a wait brought nothing
        while is_active():
            ended = idle and self.store.snapshot(video_id).status in ENDED
            evs = self.store.wait_events(video_id, after, timeout=0 if ended else 0.5)
            if ended and not evs:
                return
            idle = not evs
            for ev in evs:
                after = ev.sequence
                yield ev
                if ev.WhichOneof("event") in ("completed", "failed", "cancelled"):
                    return

    # --- execution --------------------------------------------------------------------------------


def _storage(s: GatewaySettings) -> Storage:
    if s.storage == "s3":
        from gateway.s3_storage import S3Storage

        return S3Storage(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_bucket, secure=s.s3_secure,
                         url_expiry=s.url_expiry_seconds, public_url=s.s3_public_url, region=s.s3_region)  # fmt: skip
    return LocalStorage(Path(s.data_dir) / "videos")


def open_store(s: GatewaySettings) -> JobStore:
    """The job store the settings name: PostgreSQL for a postgresql:// URL, else SQLite."""
    if s.postgres:
        from gateway.pg_store import PostgresJobStore

        return PostgresJobStore(s.database, pool_size=s.database_pool, timeout=s.database_timeout)
    return SQLiteJobStore(Path(s.database) if s.database else Path(s.data_dir) / "jobs.sqlite3")
