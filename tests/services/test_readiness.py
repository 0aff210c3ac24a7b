"""A service that has not loaded its model answers UNAVAILABLE with a retry delay (never INTERNAL),
while its health and reflection answer all along."""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videomesh.errors import details_of
from videomesh.launch import build, load_settings
from videomesh.v1 import encoder_pb2, encoder_pb2_grpc


def test_calls_before_load_are_unavailable_with_retry_info():
    server, load, close = build("encoder", load_settings("encoder", env={}, model="tiny"))
    server.start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = encoder_pb2_grpc.TextEncoderStub(ch)
            try:
                stub.Encode(encoder_pb2.EncodeRequest(texts=["a red ball"]), timeout=5)
                raise AssertionError("Encode answered before the model was loaded")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                info = details_of(e)
                assert info["reason"] == "NOT_READY" and info["retry_after"] > 0
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="videomesh.v1.TextEncoder"), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            load()
            server.set_serving(True)
            reply = stub.Encode(encoder_pb2.EncodeRequest(texts=["a red ball"]), timeout=30)
            assert reply.model
    finally:
        close()
        server.stop(0)
