"""gRPC adapter for the text encoder."""

from __future__ import annotations

from services.encoder.encoder import TextEncoding
from videomesh import codec
from videomesh.v1 import encoder_pb2, encoder_pb2_grpc

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["TextEncoder"].full_name


class TextEncoderServicer(encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, encoding: TextEncoding):
        self.encoding = encoding
        self.calls = 0  # tests use it to prove a refused prompt never reached the encoder

    def Encode(self, request, context):
        self.calls += 1
        texts = list(request.texts)
        out = self.encoding.encode(texts)
        return encoder_pb2.EncodeResponse(
            embeddings=codec.to_proto(out.states),  # bf16 stays bf16 on the wire
            mask=codec.to_proto(out.mask),
            model=self.encoding.name,
            languages=out.languages,
            notes=[encoder_pb2.EncodeNote(index=i, reason=r, message=m) for i, r, m in out.notes],
        )


def registration(servicer: TextEncoderServicer):
    return (encoder_pb2_grpc.add_TextEncoderServicer_to_server, servicer, SERVICE_NAME)
