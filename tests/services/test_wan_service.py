"""The denoiser service serving Wan over a real channel: a tiny Wan2.2-A14B-layout directory
(tests/wan_tiny.py) loaded through the production path, texts encoded in the test with the
directory's UMT5 (no encoder service), frames compared with the in-process backend and WanPipeline."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("ftfy")

from services.denoiser.backends.base import DenoiseJob  # noqa: E402
from services.denoiser.backends.loop import sample  # noqa: E402
from services.denoiser.backends.wan import WanBackend  # noqa: E402
from services.encoder.umt5 import UMT5TextEncoder  # noqa: E402
from tests.helpers import _settings, start_service  # noqa: E402
from tests.wan_tiny import save_tiny_wan  # noqa: E402
from videomesh import codec  # noqa: E402
from videomesh.client import channel  # noqa: E402
from videomesh.errors import details_of  # noqa: E402
from videomesh.model_dir import ModelDirError  # noqa: E402
from videomesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc  # noqa: E402

W, H, FRAMES = 32, 16, 9  # 3 latent frames: 1 + 4 + 4 frames


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "a14b", "a14b")


@pytest.fixture(scope="module")
def encoder(wan_dir):
    return UMT5TextEncoder.from_dir(wan_dir, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def backend(wan_dir):
    return WanBackend.load(wan_dir, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def service(wan_dir):
    server, stop = start_service("denoiser", model="wan2.2", model_dir=wan_dir)
    yield server
    stop()


@pytest.fixture(scope="module")
def stub(service):
    return denoiser_pb2_grpc.DenoiserStub(channel(service.address))


def _texts(encoder, prompt, negative):
    enc = encoder.encode([prompt, negative])
    return enc.states[:1], enc.mask[:1], enc.states[1:], enc.mask[1:]


def _request(encoder, prompt="a red ball moving left", negative="", **kw) -> denoiser_pb2.DenoiseRequest:
    text, mask, neg, neg_mask = _texts(encoder, prompt, negative)
    fields = dict(num_frames=FRAMES, width=W, height=H, seed=0, num_steps=4, guidance_scale=5.0,
                  encoder_model=encoder.name)  # fmt: skip
    fields.update(kw)
    return denoiser_pb2.DenoiseRequest(
        text_embeddings=codec.to_proto(text), text_mask=codec.to_proto(mask),
        negative_embeddings=codec.to_proto(neg), negative_mask=codec.to_proto(neg_mask), **fields,
    )  # fmt: skip


def _job(encoder, prompt="a red ball moving left", negative="", **kw) -> DenoiseJob:
    text, mask, neg, neg_mask = _texts(encoder, prompt, negative)
    fields = dict(frames=FRAMES, width=W, height=H, seed=0, steps=4, guidance=5.0)
    fields.update(kw)
    return DenoiseJob(text, mask, neg, neg_mask, **fields)


def _collect(events, on_event=None):
    """(frames (T, H, W, 3) uint8, progress events, number of frame messages, done)"""
    asm, frames, progress, chunks, done = codec.FrameAssembler(), [], [], 0, None
    for ev in events:
        if on_event is not None:
            on_event(ev)
        kind = ev.WhichOneof("event")
        if kind == "progress":
            progress.append(ev.progress)
        elif kind == "frames":
            chunks += 1
            frames += asm.add(ev.frames)
        else:
            done = ev.done
    return np.stack(frames), progress, chunks, done


def test_denoise_stream_equals_the_backend_and_wan_pipeline(wan_dir, encoder, backend, stub, service):
    from diffusers import AutoencoderKLWan, WanPipeline

    prompt, negative = "一个红色的球向左移动", "blurry, static"
    # the servicer's VAE decode waits, after its first latent frame, until the client holds those
    # frames: the stream would hang here (and fail) if frames were sent only after the whole decode
    first_frames = threading.Event()
    served = service.servicer.backend
    real_decode = served.decode

    def gated_decode(state):
        for i, chunk in enumerate(real_decode(state)):
            if i == 1:
                assert first_frames.wait(30), (
                    "the first frames did not reach the client before the rest decoded"
                )
            yield chunk

    served.decode = gated_decode
    try:
        req = _request(
            encoder, prompt, negative, seed=7, num_steps=6, guidance_scale=4.0, guidance_scale_2=2.5
        )
        frames, progress, chunks, done = _collect(
            stub.Denoise(req, timeout=120),
            lambda ev: ev.WhichOneof("event") == "frames" and first_frames.set(),
        )
    finally:
        del served.decode
    job = _job(encoder, prompt, negative, seed=7, steps=6, guidance=4.0, guidance_2=2.5)
    alone = sample(backend, job)
    assert frames.shape == (FRAMES, H, W, 3) and np.array_equal(frames, alone) and frames.std() > 0
    assert (
        chunks >= 3 and done.num_frames == FRAMES and done.fps == 16.0
    )  # one message per latent frame at least

    vae = AutoencoderKLWan.from_pretrained(wan_dir, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(wan_dir, vae=vae, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, negative_prompt=negative, num_frames=FRAMES, height=H, width=W, num_inference_steps=6,
               guidance_scale=4.0, guidance_scale_2=2.5, generator=torch.Generator().manual_seed(7),
               output_type="np").frames[0]  # fmt: skip
    assert np.array_equal(frames, (ref * 255).round().astype(np.uint8))

    # progress: every step once, naming its expert; the switch exactly where t crosses the boundary
    assert [p.step for p in progress] == list(range(1, 7)) and {p.total for p in progress} == {6}
    experts = [p.expert for p in progress]
    assert experts[0] == "high_noise" and experts[-1] == "low_noise"
    switch = experts.index("low_noise")
    assert experts == ["high_noise"] * switch + ["low_noise"] * (6 - switch)
    assert all((p.expert == "high_noise") == (p.sigma >= np.float32(0.875)) for p in progress)
    state = backend.start(job)
    assert experts == [backend.expert_for(state.__class__(**{**state.__dict__, "step": i})) for i in range(6)]


def test_guidance_scale_2_is_honoured(encoder, backend, stub):
    low = _collect(stub.Denoise(_request(encoder, seed=2, guidance_scale_2=1.5), timeout=120))[0]
    assert np.array_equal(low, sample(backend, _job(encoder, seed=2, guidance_2=1.5)))
    assert not np.array_equal(low, sample(backend, _job(encoder, seed=2)))


def test_concurrent_requests_give_the_frames_each_gives_alone(encoder, backend, stub, service):
    """Three requests with different prompts, seeds and steps, each starting once the previous one is
    under way: stepped together (batched per expert and latent shape), each gets its frames alone."""
    specs = [
        dict(prompt="a blue box moving right", seed=1, num_steps=8, guidance_scale=4.0, guidance_scale_2=3.0),
        dict(prompt="白い背景の上を跳ねる猫", negative="blurry", seed=2, num_steps=6, guidance_scale=6.0),
        dict(
            prompt="a dog on the street at night",
            seed=3,
            num_steps=6,
            guidance_scale=3.5,
            width=16,
            height=32,
        ),
    ]
    served = service.servicer.backend
    sizes, real_forward = [], served.forward

    def counting_forward(expert, states):
        sizes.append(len(states))
        time.sleep(0.1)  # a step as slow as a real model's, relative to a request's arrival
        return real_forward(expert, states)

    served.forward = counting_forward
    out: dict[int, tuple] = {}
    started = [threading.Event() for _ in specs]

    def call(i, spec):
        req = _request(encoder, **spec)
        out[i] = _collect(
            stub.Denoise(req, timeout=300),
            lambda ev: ev.WhichOneof("event") == "progress" and started[i].set(),
        )

    threads = [threading.Thread(target=call, args=(i, s)) for i, s in enumerate(specs)]
    try:
        for i, t in enumerate(threads):
            t.start()
            assert started[i].wait(60)  # the next one arrives while this one is stepping
        for t in threads:
            t.join(300)
    finally:
        del served.forward
    assert max(sizes) > 1, sizes  # requests shared forwards
    for i, spec in enumerate(specs):
        spec = dict(spec)
        job = _job(encoder, spec.pop("prompt"), spec.pop("negative", ""), seed=spec.pop("seed"),
                   steps=spec.pop("num_steps"), guidance=spec.pop("guidance_scale"),
                   guidance_2=spec.pop("guidance_scale_2", 0.0), **spec)  # fmt: skip
        assert np.array_equal(out[i][0], sample(backend, job)), i


def test_model_info_publishes_the_backends_rules(encoder, stub):
    m = stub.GetModelInfo(denoiser_pb2.GetModelInfoRequest(), timeout=10)
    assert (m.backend, m.fps, m.text_length, m.text_dim, m.upscale) == ("wan2.2", 16.0, 512, 32, False)
    assert [(s.width, s.height) for s in m.sizes] == [(1280, 720), (720, 1280), (832, 480), (480, 832)]
    assert m.size_rule.multiple == 16 and m.size_rule.min_side == 16 and len(m.size_rule.official) == 4
    assert (m.size_rule.default_size.width, m.size_rule.default_size.height) == (1280, 720)
    assert (m.frame_rule.step, m.frame_rule.default_frames, list(m.frame_counts)) == (4, 81, [81])
    assert [(e.name, round(e.boundary, 3), e.default_guidance) for e in m.experts] == [
        ("high_noise", 0.875, 4.0), ("low_noise", 0.875, 3.0),
    ]  # fmt: skip
    assert all(e.parameters > 0 for e in m.experts)
    assert (m.default_steps, m.max_steps, m.encoder_model, m.trained) == (40, 200, encoder.name, True)
    assert m.capacity == 4 and list(m.adapters) == []


def test_default_model_info_keeps_its_values():
    server, stop = start_service("denoiser", model="tiny")
    try:
        m = denoiser_pb2_grpc.DenoiserStub(channel(server.address)).GetModelInfo(
            denoiser_pb2.GetModelInfoRequest(), timeout=10
        )
    finally:
        stop()
    assert (m.backend, m.upscale, m.text_length, m.capacity) == ("default", True, 0, 8)  # max_batch 8
    assert [(s.width, s.height) for s in m.sizes] == [(16, 16)] and list(m.frame_counts) == [4]
    assert m.size_rule.multiple == 0 and m.frame_rule.step == 0 and m.frame_rule.default_frames == 4
    assert [(e.name, e.default_guidance) for e in m.experts] == [("high_noise", 5.0), ("low_noise", 2.0)]
    assert m.encoder_model == "tiny@untrained" and m.default_guidance == 5.0


def _error(stub, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Denoise(req, timeout=60))
    return e.value


@pytest.mark.parametrize(
    "change, field, message",
    [
        (dict(num_frames=8), "num_frames", "num_frames must be 4k+1 for this VAE; got 8 — use 9"),
        (dict(width=40), "width", "width must be a multiple of 16"),
        (dict(height=20), "height", "height must be a multiple of 16"),
        (dict(image=common_pb2.Image(data=b"\x89PNG", mime_type="image/png")), "image", "not served yet"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_rule(encoder, stub, change, field, message):
    err = _error(stub, _request(encoder, **change))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()
    assert [f for f, _ in details_of(err)["violations"]] == [field]


def test_foreign_encoder_is_failed_precondition_naming_both(encoder, stub):
    err = _error(stub, _request(encoder, encoder_model="umt5@0123456789ab"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "umt5@0123456789ab" in err.details() and encoder.name in err.details()
    assert details_of(err)["reason"] == "ENCODER_MISMATCH"


def test_bad_model_dir_fails_at_start_up(tmp_path, wan_dir):
    with pytest.raises(ValueError, match="model wan2.2 needs model_dir"):
        _settings("denoiser", model="wan2.2")
    with pytest.raises(ModelDirError, match="does not exist"):
        _settings("denoiser", model="wan2.2", model_dir=tmp_path / "nope")
    with pytest.raises(ModelDirError, match="model_index.json not found"):
        _settings("denoiser", model="wan2.2", model_dir=tmp_path)
    with pytest.raises(ValueError, match="model_dir is for --model wan2.2"):
        _settings("denoiser", model="tiny", model_dir=wan_dir)
    # the service itself: a non-zero exit whose last line names the file
    run = subprocess.run([sys.executable, "-m", "services.denoiser", "--model", "wan2.2", "--model-dir",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0 and "nope" in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
