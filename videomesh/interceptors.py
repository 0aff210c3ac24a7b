"""One shape for the client interceptors of the mesh (the mesh credential, trace context): grpc asks a
client interceptor for four methods, one per kind of call; these all have the same body, `call()`."""

from __future__ import annotations

import collections

import grpc

_Details = collections.namedtuple(
    "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
)


class _CallDetails(_Details, grpc.ClientCallDetails):
    pass


def with_metadata(d: grpc.ClientCallDetails, pairs) -> grpc.ClientCallDetails:
    """`d` with the (key, value) `pairs` added to its metadata."""
    return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), *pairs], d.credentials,
                        getattr(d, "wait_for_ready", None), getattr(d, "compression", None))  # fmt: skip


class ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Subclasses implement `call(continuation, details, request_or_iterator)` for every kind of call."""

    def call(self, continuation, details: grpc.ClientCallDetails, request):
        raise NotImplementedError

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self.call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self.call(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self.call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self.call(continuation, client_call_details, request_iterator)
