"""gRPC adapter for the public VideoService: authenticate, parse, call VideoGateway, map errors."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from gateway.gateway import VideoGateway
from gateway.metrics import METRICS
from gateway.tenants import Tenant, TenantDirectory, key_from_metadata
from videomesh.errors import ResourceExhausted
from videomesh.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["VideoService"].full_name


class StreamSlots:
    """Caps open event streams (WatchVideo, GenerateVideo): per tenant, and in all.

    Each open stream holds one of the server's worker threads for as long as it lasts, so
    without a cap one tenant's idle streams take every worker and other tenants' calls and
    the health check wait. The total stays below the worker count for the same reason."""

    def __init__(self, per_tenant: int, total: int):
        self.per_tenant = per_tenant
        self.total = total
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def acquire(self, tenant: str) -> Callable[[], None]:
        """A slot for `tenant`, or ResourceExhausted with a retry delay; returns its release (idempotent)."""
        with self._lock:
            if self._open[tenant] >= self.per_tenant:
                METRICS.rejected.labels(reason="TOO_MANY_STREAMS").inc()
                raise ResourceExhausted(
                    f"{self._open[tenant]} of your event streams (WatchVideo, GenerateVideo) are open; the limit "
                    f"is {self.per_tenant}: close one, or poll GetVideo", retry_after=5.0, reason="TOO_MANY_STREAMS",
                )  # fmt: skip
            if sum(self._open.values()) >= self.total:
                METRICS.rejected.labels(reason="STREAMS_BUSY").inc()
                raise ResourceExhausted(
                    f"the gateway has its maximum of {self.total} event streams open; retry later or poll GetVideo",
                    retry_after=2.0, reason="STREAMS_BUSY",
                )  # fmt: skip
            self._open[tenant] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._open[tenant] -= 1
                if self._open[tenant] <= 0:
                    del self._open[tenant]

        return release

    def open(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._open[tenant] if tenant is not None else sum(self._open.values())


class VideoServiceServicer(gateway_pb2_grpc.VideoServiceServicer):
    def __init__(self, gateway: VideoGateway, tenants: TenantDirectory):
        self.gw = gateway
        self.tenants = tenants
        s = gateway.settings
        self.streams = StreamSlots(s.max_streams_per_tenant, s.max_streams)

    def _tenant(self, context) -> Tenant:
        return self.tenants.authenticate(key_from_metadata(context.invocation_metadata()))

    def _stream_slot(self, tenant: Tenant, context) -> Callable[[], None]:
        """Take a stream slot; it is released when the handler ends and, should the handler be
        left suspended, when the RPC terminates (client gone, deadline)."""
        release = self.streams.acquire(tenant.name)
        if not context.add_callback(release):  # the RPC has already terminated
            release()
        return release

    def CreateVideo(self, request, context):
        return self.gw.create(
            self._tenant(context), request.spec, request.request_id, webhook_url=request.webhook_url
        )

    def GenerateVideo(self, request, context):
        t = self._tenant(context)
        release = self._stream_slot(t, context)  # before the job exists: a refused stream creates none
        try:
            video = self.gw.create(t, request.spec, request.request_id, webhook_url=request.webhook_url)
            finished = False
            # The job belongs to this stream: if the client goes away (cancel, deadline), cancel it.
            # Not when the server ended it (draining): the job is handed back and runs on; the client
            # re-attaches with WatchVideo.
            context.add_callback(
                lambda: (
                    finished
                    or self.gw.runner.draining.is_set()
                    or self.gw.cancel_quietly(video.id, "the GenerateVideo stream ended")
                )
            )
            for ev in self.gw.events(t.name, video.id, 0, context.is_active):
                if ev.WhichOneof("event") in ("completed", "failed", "cancelled"):
                    finished = True
                yield ev
        finally:
            release()

    def WatchVideo(self, request, context):
        t = self._tenant(context)
        release = self._stream_slot(t, context)
        try:
            yield from self.gw.events(t.name, request.id, request.after_sequence, context.is_active)
        finally:
            release()

    def GetVideo(self, request, context):
        return self.gw.get(self._tenant(context).name, request.id)

    def ListVideos(self, request, context):
        videos, token = self.gw.list(
            self._tenant(context).name,
            page_size=request.page_size,
            page_token=request.page_token,
            status=request.status,
        )
        return gateway_pb2.ListVideosResponse(videos=videos, next_page_token=token)

    def CancelVideo(self, request, context):
        return self.gw.cancel(self._tenant(context).name, request.id)

    def RegenerateVideo(self, request, context):
        t = self._tenant(context)
        seed = request.seed if request.HasField("seed") else None
        return self.gw.regenerate(t, request.id, seed, request.request_id)

    def VerifyWatermark(self, request_iterator, context):
        t = self._tenant(context)
        release = self._stream_slot(t, context)  # a slow upload holds a server thread like a watcher
        try:
            return self.gw.verify_watermark(t, (r.chunk for r in request_iterator))
        finally:
            release()

    def DeleteVideo(self, request, context):
        return self.gw.delete(self._tenant(context), request.id)

    def SubmitFeedback(self, request, context):
        fid = self.gw.feedback(self._tenant(context), request.id, request.rating, request.reason)
        return gateway_pb2.SubmitFeedbackResponse(feedback_id=fid)

    def ListTemplates(self, request, context):
        self._tenant(context)
        return gateway_pb2.ListTemplatesResponse(
            templates=[t.proto() for t in self.gw.templates.templates.values()]
        )

    def CreateVideoFromTemplate(self, request, context):
        return self.gw.create_from_template(
            self._tenant(context),
            request.template_id,
            dict(request.fields),
            request.overrides,
            request.request_id,
        )

    def GetUsage(self, request, context):
        return self.gw.usage(self._tenant(context), float(request.since_unix))

    def ListStyleAdapters(self, request, context):
        return gateway_pb2.ListStyleAdaptersResponse(
            adapters=self.gw.adapters_for(self._tenant(context).name)
        )

    def ReviewVideo(self, request, context):
        return self.gw.review(self._tenant(context), request.id, request.approve, request.note)

    def DownloadVideo(self, request, context):
        t = self._tenant(context)
        release = self._stream_slot(t, context)  # a slow reader holds a server thread like a watcher
        try:
            yield from self.gw.download(t.name, request.id)
        finally:
            release()


def registration(servicer: VideoServiceServicer):
    return (gateway_pb2_grpc.add_VideoServiceServicer_to_server, servicer, SERVICE_NAME)
