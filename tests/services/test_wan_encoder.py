"""The encoder service serving UMT5 for the Wan backend, through gRPC.

A tiny two-expert Wan directory (tests/wan_tiny.py) is saved in the diffusers layout and served by
the production path (`videomesh.launch.build("encoder", ...)` with model wan2.2). The states must be
WanPipeline's own (bf16, zero-padded to 512 tokens), a prompt over 512 tokens is truncated with a
PROMPT_TRUNCATED note, the default model's world note is never sent, and 8 MiB replies (a prompt and
its negative at Wan's real width, 512 x 4096 bf16 each) pass the raised message limits.
"""

from __future__ import annotations

import shutil

import grpc
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("ftfy")

from gateway.pipeline import Downstreams  # noqa: E402
from services.encoder.encoder import Encoded, EncoderSettings  # noqa: E402
from tests.helpers import start_service  # noqa: E402
from tests.wan_tiny import save_tiny_wan  # noqa: E402
from videomesh import codec  # noqa: E402
from videomesh.client import channel  # noqa: E402
from videomesh.model_dir import ModelDirError, WanModelDir  # noqa: E402
from videomesh.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc  # noqa: E402

LONG = "a " * 600  # 600 words of one token each, plus </s>: 601 tokens, 1200 characters


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "a14b", "a14b")


@pytest.fixture(scope="module")
def encoder(wan_dir):
    server, stop = start_service("encoder", model="wan2.2", model_dir=wan_dir)
    yield server
    stop()


def _encode(address: str, texts: list[str], limit: int = codec.TEXT_MESSAGE_BYTES):
    with channel(address, max_message_bytes=limit) as ch:
        return encoder_pb2_grpc.TextEncoderStub(ch).Encode(encoder_pb2.EncodeRequest(texts=texts), timeout=60)


def _pipeline_states(wan_dir, text: str) -> torch.Tensor:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan_dir, dtype=torch.bfloat16)
    with torch.no_grad():  # as WanPipeline.__call__ runs it (with autograd on, bf16 CPU kernels differ)
        states, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=512)
    return states


def test_a_512_token_prompt_is_truncated_as_wanpipeline_does_with_a_note(encoder, wan_dir):
    resp = _encode(encoder.address, [LONG, ""])
    assert resp.embeddings.dtype == common_pb2.DTYPE_BFLOAT16  # bf16 on the wire, never widened
    rows = codec.split_rows(resp.embeddings, name="embeddings")
    assert [list(r.shape) for r in rows] == [[1, 512, 32], [1, 512, 32]]
    got = codec.to_torch(rows[0])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, _pipeline_states(wan_dir, LONG))
    mask = codec.to_torch(resp.mask)
    assert mask.dtype == torch.bool and mask[0].all() and mask[1].sum() == 1  # "" is just </s>
    assert [(n.index, n.reason) for n in resp.notes] == [(0, "PROMPT_TRUNCATED")]
    assert "601 tokens" in resp.notes[0].message and "first 512" in resp.notes[0].message


def test_the_model_name_is_the_identity_the_denoiser_publishes_and_no_world_note(encoder, wan_dir):
    resp = _encode(encoder.address, ["一只猫在街道上跳舞", "blurry"])
    d = WanModelDir.open(wan_dir)
    assert resp.model == f"umt5@{d.identity('tokenizer', 'text_encoder')}"
    assert not resp.notes  # names no shape of the default world, and that note is the default model's only
    assert list(resp.languages) == ["zh", "en"]
    # the negative's states are WanPipeline's too, and zero after its own tokens (not <pad> states)
    neg = codec.to_torch(codec.split_rows(resp.embeddings)[1])
    assert torch.equal(neg, _pipeline_states(wan_dir, "blurry"))
    n = int(codec.to_torch(resp.mask)[1].sum())
    assert n > 1 and not neg[0, n:].any()


def test_bad_start_up_settings_name_what_is_missing(tmp_path, wan_dir):
    with pytest.raises(ValueError, match="model wan2.2 needs model_dir"):
        EncoderSettings(model="wan2.2").validate()
    broken = tmp_path / "broken"
    shutil.copytree(wan_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelDirError, match=r"text_encoder/ not found"):
        EncoderSettings(model="wan2.2", model_dir=broken).validate()
    with pytest.raises(ModelDirError, match="model_index.json not found"):
        EncoderSettings(model="wan2.2", model_dir=tmp_path).validate()
    with pytest.raises(ValueError, match="wan2.2"):
        EncoderSettings(model="nope").validate()
    assert EncoderSettings(model="wan2.2", model_dir=wan_dir).message_limit == codec.TEXT_MESSAGE_BYTES
    assert EncoderSettings().message_limit == codec.MAX_MESSAGE_BYTES


def test_real_size_text_states_pass_the_raised_limits_and_not_the_old_ones(encoder):
    """A prompt and its negative at Wan's real width (512 x 4096 bf16, 4 MiB each): 8 MiB in one reply."""
    domain = encoder.servicer.encoding
    real = torch.randn(2, 512, 4096).to(torch.bfloat16)
    mask = torch.ones(2, 512, dtype=torch.bool)
    orig = domain.encode
    domain.encode = lambda texts: Encoded(real, mask, ["en", "en"], [])
    try:
        ds = Downstreams(encoder.address, "127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
        try:  # the gateway's channel to the encoder takes it whole
            resp = ds.encoder.Encode(encoder_pb2.EncodeRequest(texts=["x", ""]), timeout=60)
        finally:
            ds.close()
        rows = codec.split_rows(resp.embeddings)
        assert len(resp.embeddings.data) == 8 * 1024 * 1024
        assert torch.equal(codec.to_torch(rows[1])[0], real[1])  # each row is exactly 4 MiB: decodable
        with pytest.raises(grpc.RpcError) as err:  # a channel at the old 4 MiB limit cannot
            _encode(encoder.address, ["x", ""], limit=codec.MAX_MESSAGE_BYTES)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        domain.encode = orig


def test_a_batch_is_capped_to_what_one_reply_can_carry(encoder):
    domain = encoder.servicer.encoding
    assert domain.max_batch() == 16  # tiny states: the usual cap
    real_width = 512 * (4096 * 2 + 1)
    assert (codec.TEXT_MESSAGE_BYTES - 64 * 1024) // real_width == 7  # UMT5-XXL: 7 texts per call
