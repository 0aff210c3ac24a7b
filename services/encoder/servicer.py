"""gRPC adapter for the text encoder."""

from __future__ import annotations

from services.encoder.encoder import TextEncoding, world_notes
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
        states, mask, langs = self.encoding.encode(texts)
        return encoder_pb2.EncodeResponse(
            embeddings=codec.to_proto(states),
            mask=codec.to_proto(mask),
            model=self.encoding.name,
            languages=langs,
            notes=[encoder_pb2.EncodeNote(index=i, reason=r, message=m) for i, r, m in world_notes(texts)],
        )


def registration(servicer: TextEncoderServicer):
    return (encoder_pb2_grpc.add_TextEncoderServicer_to_server, servicer, SERVICE_NAME)
