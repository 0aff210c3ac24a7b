"""Typed client SDK: channels with the mesh's retry policy, and a VideoService client.

Retries of UNAVAILABLE use gRPC's own retry machinery (service config JSON on the channel),
not hand-written loops, so they also apply inside streaming calls until the first response.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from videomesh.codec import MAX_MESSAGE_BYTES
from videomesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

API_KEY_ENV = "VIDEOMESH_API_KEY"
GATEWAY_ENV = "VIDEOMESH_GATEWAY"
DEV_KEY_FILE = Path(os.environ.get("VIDEOMESH_HOME", Path.home() / ".videomesh")) / "dev-api-key"


def retry_service_config(
    services: list[str], *, attempts: int = 4, initial: float = 0.2, maximum: float = 2.0
) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": s} for s in services],
                    "retryPolicy": {
                        "maxAttempts": attempts,
                        "initialBackoff": f"{initial}s",
                        "maxBackoff": f"{maximum}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def channel(address: str, *, services: list[str] | None = None, retries: int = 4) -> grpc.Channel:
    """An insecure channel with explicit size limits and (for `services`) the retry policy."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if services:
        options.append(("grpc.service_config", retry_service_config(services, attempts=retries)))
    return grpc.insecure_channel(address, options=options)


def find_api_key(explicit: str | None = None) -> str | None:
    """--api-key, else $VIDEOMESH_API_KEY, else the dev key `videomesh up` wrote."""
    if explicit:
        return explicit
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    if DEV_KEY_FILE.exists():
        return DEV_KEY_FILE.read_text().strip()
    return None


class VideoClient:
    """The public API in a few typed calls."""

    def __init__(self, address: str, api_key: str | None = None):
        self.address = address
        self._channel = channel(address, services=["videomesh.v1.VideoService"])
        self.stub = gateway_pb2_grpc.VideoServiceStub(self._channel)
        key = find_api_key(api_key)
        self._metadata = [("authorization", f"Bearer {key}")] if key else []

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def create(
        self, spec: common_pb2.VideoSpec, request_id: str = "", timeout: float | None = 30
    ) -> gateway_pb2.Video:
        return self.stub.CreateVideo(
            gateway_pb2.CreateVideoRequest(spec=spec, request_id=request_id),
            metadata=self._metadata,
            timeout=timeout,
        )

    def generate(
        self, spec: common_pb2.VideoSpec, request_id: str = "", timeout: float | None = None
    ) -> Iterator[gateway_pb2.VideoEvent]:
        return self.stub.GenerateVideo(
            gateway_pb2.CreateVideoRequest(spec=spec, request_id=request_id),
            metadata=self._metadata,
            timeout=timeout,
        )

    def watch(
        self, video_id: str, after: int = 0, timeout: float | None = None
    ) -> Iterator[gateway_pb2.VideoEvent]:
        return self.stub.WatchVideo(
            gateway_pb2.WatchVideoRequest(id=video_id, after_sequence=after),
            metadata=self._metadata,
            timeout=timeout,
        )

    def get(self, video_id: str) -> gateway_pb2.Video:
        return self.stub.GetVideo(
            gateway_pb2.GetVideoRequest(id=video_id), metadata=self._metadata, timeout=30
        )

    def list(
        self, page_size: int = 20, page_token: str = "", status: int = 0
    ) -> gateway_pb2.ListVideosResponse:
        return self.stub.ListVideos(
            gateway_pb2.ListVideosRequest(page_size=page_size, page_token=page_token, status=status),
            metadata=self._metadata,
            timeout=30,
        )

    def cancel(self, video_id: str) -> gateway_pb2.Video:
        return self.stub.CancelVideo(
            gateway_pb2.CancelVideoRequest(id=video_id), metadata=self._metadata, timeout=30
        )

    def verify_watermark(self, path, chunk: int = 1 << 20) -> gateway_pb2.VerifyWatermarkResponse:
        def chunks():
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    yield gateway_pb2.VerifyWatermarkRequest(chunk=block)

        return self.stub.VerifyWatermark(chunks(), metadata=self._metadata, timeout=120)

    def delete(self, video_id: str) -> gateway_pb2.Video:
        return self.stub.DeleteVideo(
            gateway_pb2.DeleteVideoRequest(id=video_id), metadata=self._metadata, timeout=30
        )

    def feedback(self, video_id: str, rating: int, reason: str = "") -> str:
        req = gateway_pb2.SubmitFeedbackRequest(id=video_id, rating=rating, reason=reason)
        return self.stub.SubmitFeedback(req, metadata=self._metadata, timeout=30).feedback_id

    def templates(self) -> list[gateway_pb2.Template]:
        return list(
            self.stub.ListTemplates(
                gateway_pb2.ListTemplatesRequest(), metadata=self._metadata, timeout=30
            ).templates
        )

    def style_adapters(self) -> list[common_pb2.AdapterInfo]:
        """The brand style adapters this tenant may use (public ones and its own)."""
        return list(
            self.stub.ListStyleAdapters(
                gateway_pb2.ListStyleAdaptersRequest(), metadata=self._metadata, timeout=30
            ).adapters
        )

    def create_from_template(self, template_id: str, fields: dict[str, str], overrides: common_pb2.VideoSpec | None = None,
                             request_id: str = "") -> gateway_pb2.Video:  # fmt: skip
        req = gateway_pb2.CreateVideoFromTemplateRequest(template_id=template_id, fields=fields, request_id=request_id,
                                                         overrides=overrides or common_pb2.VideoSpec())  # fmt: skip
        return self.stub.CreateVideoFromTemplate(req, metadata=self._metadata, timeout=30)

    def usage(self, since_unix: int = 0) -> gateway_pb2.Usage:
        return self.stub.GetUsage(
            gateway_pb2.GetUsageRequest(since_unix=since_unix), metadata=self._metadata, timeout=30
        )

    def review(self, video_id: str, approve: bool, note: str = "") -> gateway_pb2.Video:
        return self.stub.ReviewVideo(
            gateway_pb2.ReviewVideoRequest(id=video_id, approve=approve, note=note),
            metadata=self._metadata,
            timeout=30,
        )

    def regenerate(self, video_id: str, seed: int | None = None, request_id: str = "") -> gateway_pb2.Video:
        req = gateway_pb2.RegenerateVideoRequest(id=video_id, request_id=request_id)
        if seed is not None:
            req.seed = seed
        return self.stub.RegenerateVideo(req, metadata=self._metadata, timeout=30)
