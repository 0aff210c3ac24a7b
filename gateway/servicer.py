"""gRPC adapter for the public VideoService: authenticate, parse, call VideoGateway, map errors."""

from __future__ import annotations

from gateway.gateway import VideoGateway
from gateway.tenants import Tenant, TenantDirectory, key_from_metadata
from videomesh.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["VideoService"].full_name


class VideoServiceServicer(gateway_pb2_grpc.VideoServiceServicer):
    def __init__(self, gateway: VideoGateway, tenants: TenantDirectory):
        self.gw = gateway
        self.tenants = tenants

    def _tenant(self, context) -> Tenant:
        return self.tenants.authenticate(key_from_metadata(context.invocation_metadata()))

    def CreateVideo(self, request, context):
        return self.gw.create(
            self._tenant(context), request.spec, request.request_id, webhook_url=request.webhook_url
        )

    def GenerateVideo(self, request, context):
        t = self._tenant(context)
        video = self.gw.create(t, request.spec, request.request_id, webhook_url=request.webhook_url)
        finished = False
        # The job belongs to this stream: if the client goes away (cancel, deadline), cancel it.
        context.add_callback(
            lambda: finished or self.gw.cancel_quietly(video.id, "the GenerateVideo stream ended")
        )
        for ev in self.gw.events(t.name, video.id, 0, context.is_active):
            if ev.WhichOneof("event") in ("completed", "failed", "cancelled"):
                finished = True
            yield ev

    def WatchVideo(self, request, context):
        t = self._tenant(context)
        yield from self.gw.events(t.name, request.id, request.after_sequence, context.is_active)

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
        return self.gw.verify_watermark(self._tenant(context), (r.chunk for r in request_iterator))

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


def registration(servicer: VideoServiceServicer):
    return (gateway_pb2_grpc.add_VideoServiceServicer_to_server, servicer, SERVICE_NAME)
