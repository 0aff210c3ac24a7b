"""Wan2.2 through the mesh.

1. The gateway's side against a fake denoiser (a small servicer publishing a Wan-like ModelInfo and
   recording what it was asked): the real UMT5 encoder service (tiny Wan directory), upscaler, QC and
   gateway. bf16 text states reach the denoiser unwidened; size, frame count and guidance_scale_2 are
   passed through; frames come back at the requested size and native rate unchanged (or interpolated
   to 24 fps); a prompt over 512 tokens is a warning in the job's events; bad specs name the rule.
2. End to end, as a user runs it: `videomesh up --model wan2.2 --model-dir DIR` + `videomesh generate`
   at native size and fps gives an MP4 whose frames are WanPipeline's within H.264 loss. It runs once
   the denoiser serves wan2.2 (skipped before).
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("ftfy")

from gateway.media import Mp4Writer, probe, read_frames  # noqa: E402
from tests.helpers import start_service  # noqa: E402
from tests.integration.test_cli import _cli, _start_up  # noqa: E402
from tests.wan_tiny import save_tiny_wan  # noqa: E402
from videomesh import codec  # noqa: E402
from videomesh.client import VideoClient  # noqa: E402
from videomesh.errors import details_of  # noqa: E402
from videomesh.model_dir import WanModelDir  # noqa: E402
from videomesh.serving import create_server  # noqa: E402
from videomesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.slow
LONG = "a " * 600  # 601 tokens: more than the 512 Wan reads


def _size(w, h):
    return common_pb2.Size(width=w, height=h)


def fake_frames(seed: int, n: int, width: int, height: int) -> np.ndarray:
    """Smooth frames (H.264 keeps them within a few levels) that depend on the seed and the frame."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for t in range(n):
        r = 128 + 100 * np.sin(x / width * 3.1 + t * 0.3 + seed % 7)
        g = 128 + 100 * np.cos(y / height * 2.7 + t * 0.2)
        b = np.full_like(x, 40.0 + 20 * (seed % 5))
        out.append(np.stack([r, g, b], axis=-1))
    return np.clip(np.stack(out) + 0.5, 0, 255).astype(np.uint8)


class FakeWanDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    """Publishes what a Wan2.2 T2V-A14B backend publishes; Denoise records the request and streams frames."""

    def __init__(self, encoder_model: str):
        self.encoder_model = encoder_model
        self.requests: list[denoiser_pb2.DenoiseRequest] = []

    def GetModelInfo(self, request, context):
        official = [_size(1280, 720), _size(720, 1280), _size(832, 480), _size(480, 832)]
        return denoiser_pb2.ModelInfo(
            name="wan2.2-t2v-a14b", version="fake", backend="wan2.2", upscale=False, fps=16.0, sizes=official,
            frame_counts=[81], languages=["en", "zh", "ja"], default_steps=40, max_steps=200,
            encoder_model=self.encoder_model, trained=True, capacity=2, text_length=512, text_dim=32,
            experts=[denoiser_pb2.ExpertInfo(name="high_noise", boundary=0.875, default_guidance=4.0),
                     denoiser_pb2.ExpertInfo(name="low_noise", boundary=0.875, default_guidance=3.0)],
            size_rule=denoiser_pb2.SizeRule(official=official, multiple=16, min_side=16, max_side=512,
                                            default_size=_size(64, 48)),
            frame_rule=denoiser_pb2.FrameRule(counts=[81], step=4, min_frames=1, max_frames=125, default_frames=9),
        )  # fmt: skip

    def Denoise(self, request, context):
        self.requests.append(request)
        for i in range(request.num_steps):
            expert = "high_noise" if i < request.num_steps // 2 else "low_noise"
            yield denoiser_pb2.DenoiseEvent(
                progress=denoiser_pb2.StepProgress(step=i + 1, total=request.num_steps, expert=expert)
            )
        frames = fake_frames(request.seed, request.num_frames, request.width, request.height)
        for chunk in codec.frame_chunks(frames):
            yield denoiser_pb2.DenoiseEvent(frames=chunk)
        yield denoiser_pb2.DenoiseEvent(done=denoiser_pb2.DenoiseDone(num_frames=len(frames), fps=16.0))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "a14b", "a14b")


@pytest.fixture(scope="module")
def fake_mesh(wan_dir, tmp_path_factory):
    stops = []
    enc, stop = start_service("encoder", model="wan2.2", model_dir=wan_dir)
    stops.append(stop)
    fake = FakeWanDenoiser(enc.servicer.encoding.name)
    den = create_server(
        [(denoiser_pb2_grpc.add_DenoiserServicer_to_server, fake, "videomesh.v1.Denoiser")],
        max_message_bytes=codec.TEXT_MESSAGE_BYTES,
    )
    den.start()
    den.set_serving(True)
    stops.append(lambda: den.stop(0.5))
    up, stop = start_service("upscaler")
    stops.append(stop)
    qc, stop = start_service("qc")
    stops.append(stop)
    gw, stop = start_service(
        "gateway", data_dir=tmp_path_factory.mktemp("gw"), encoder=enc.address, denoiser=den.address,
        upscaler=up.address, qc=qc.address, qc_policy="off", invisible_watermark=False,
    )  # fmt: skip
    stops.insert(0, stop)
    key = gw.tenants.add("alice", "pro")  # pro: no visible mark
    yield gw, fake, key
    for s in stops:
        s()


def _run(gw, key, spec: common_pb2.VideoSpec, tmp_path: Path):
    with VideoClient(gw.address, key) as c:
        events = list(c.generate(spec, timeout=300))
        assert events[-1].WhichOneof("event") == "completed", events[-1]
        vid = events[-1].video_id or events[0].video_id
        out = c.download(vid, tmp_path / f"{vid}.mp4")
        return c.get(vid), events, out


def test_native_size_and_rate_pass_through_with_bf16_text_and_the_request_fields(fake_mesh, tmp_path):
    gw, fake, key = fake_mesh
    spec = common_pb2.VideoSpec(prompt=LONG, negative_prompt="blurry", width=64, height=48, num_frames=9,
                                seed=11, num_steps=4, guidance_scale=4.0, guidance_scale_2=2.5)  # fmt: skip
    video, events, out = _run(gw, key, spec, tmp_path)
    req = fake.requests[-1]
    assert (req.width, req.height, req.num_frames, req.num_steps) == (64, 48, 9, 4)
    assert (req.guidance_scale, req.guidance_scale_2, req.seed) == (4.0, 2.5, 11)
    for t in (req.text_embeddings, req.negative_embeddings):
        assert t.dtype == common_pb2.DTYPE_BFLOAT16 and list(t.shape) == [1, 512, 32]  # never widened
    assert list(req.text_mask.shape) == [1, 512] and req.encoder_model.startswith("umt5@")
    assert codec.to_torch(req.text_mask).sum() == 512  # truncated to what Wan reads
    warnings = [e.warning for e in events if e.WhichOneof("event") == "warning"]
    assert [w.reason for w in warnings] == ["PROMPT_TRUNCATED"], warnings
    assert "601 tokens" in warnings[0].message and list(video.warnings) == [warnings[0].message]
    assert probe(out) == {"frames": 9, "fps": 16.0, "width": 64, "height": 48}
    got = read_frames(out).astype(np.int16)
    want = fake_frames(11, 9, 64, 48).astype(np.int16)
    assert np.abs(got - want).mean() < 2.0  # the upscaler passed them through; H.264 loss only


def test_24_fps_is_interpolated_by_the_upscaler(fake_mesh, tmp_path):
    gw, fake, key = fake_mesh
    spec = common_pb2.VideoSpec(prompt="a cat walking", width=64, height=48, num_frames=9, fps=24, seed=3)
    video, _, out = _run(gw, key, spec, tmp_path)
    assert fake.requests[-1].num_frames == 9 and fake.requests[-1].guidance_scale_2 == 0.0
    assert probe(out) == {"frames": 13, "fps": 24.0, "width": 64, "height": 48}  # 9 at 16 -> 13 at 24
    assert (video.result.num_frames, video.spec.num_frames) == (13, 9)
    assert not video.warnings  # no "outside the model's world" note for Wan


def test_defaults_come_from_the_backends_rules(fake_mesh, tmp_path):
    gw, fake, key = fake_mesh
    video, _, out = _run(gw, key, common_pb2.VideoSpec(prompt="a dog", seed=5), tmp_path)
    assert (video.spec.width, video.spec.height, video.spec.num_frames, video.spec.fps) == (64, 48, 9, 16.0)
    assert probe(out)["frames"] == 9


@pytest.mark.parametrize(
    "spec, words",
    [
        (dict(num_frames=80), "num_frames must be 4k+1 for this model; got 80 — use 81"),
        (dict(width=1000, height=576), "width 1000 is not a multiple of 16 — use 992 or 1008"),
        (dict(image=common_pb2.Image(data=b"\x89PNG", mime_type="image/png")), "not served yet"),
    ],
)
def test_bad_specs_are_invalid_argument_naming_the_rule(fake_mesh, spec, words):
    gw, fake, key = fake_mesh
    n = len(fake.requests)
    with VideoClient(gw.address, key) as c, pytest.raises(grpc.RpcError) as err:
        c.create(common_pb2.VideoSpec(prompt="a cat", **spec))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details(), err.value.details()
    assert details_of(err.value)["violations"]
    assert len(fake.requests) == n


# --- end to end: `videomesh up --model wan2.2` + `videomesh generate` against WanPipeline -----------------


def _denoiser_serves_wan(wan_dir) -> str:
    """ "" when this tree's denoiser accepts model wan2.2 with a model_dir, else why not."""
    from videomesh.launch import load_settings

    try:
        load_settings("denoiser", env={}, model="wan2.2", model_dir=wan_dir)
    except (TypeError, ValueError) as e:
        return f"the denoiser does not serve wan2.2 yet ({e})"
    return ""


def test_up_and_generate_match_wanpipeline_within_h264_loss(wan_dir, tmp_path):
    why = _denoiser_serves_wan(wan_dir)
    if why:
        pytest.skip(why)
    from diffusers import AutoencoderKLWan, WanPipeline

    env = {**os.environ, "VIDEOMESH_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
           "VIDEOMESH_GATEWAY_INVISIBLE_WATERMARK": "0", "VIDEOMESH_GATEWAY_QC_POLICY": "off"}  # fmt: skip
    up, address, lines = _start_up(
        tmp_path, "--model", "wan2.2", "--model-dir", str(wan_dir), env=env, timeout=300
    )
    try:
        threading.Thread(target=lambda: [lines.append(x) for x in up.stdout], daemon=True).start()
        prompt, negative, seed, steps, (w, h), frames = "a red ball moving left", "blurry", 42, 4, (64, 48), 9
        out = tmp_path / "clip.mp4"
        r = subprocess.run(
            _cli("generate", prompt, "--negative", negative, "--seed", str(seed), "--steps", str(steps),
                 "--guidance", "4", "--guidance-2", "3", "--size", f"{w}x{h}", "--frames", str(frames),
                 "--fps", "16", "--out", str(out), "--quiet"),
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr + r.stdout + "".join(lines)
    finally:
        up.terminate()
        up.wait(timeout=60)
    assert probe(out) == {"frames": frames, "fps": 16.0, "width": w, "height": h}

    vae = AutoencoderKLWan.from_pretrained(wan_dir, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(wan_dir, vae=vae, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompt, negative_prompt=negative, height=h, width=w, num_frames=frames,
               num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0,
               generator=torch.Generator().manual_seed(seed), output_type="np").frames[0]  # fmt: skip
    ref_u8 = (ref * 255).round().astype(np.uint8)  # (T, H, W, 3), as the backend rounds
    # the same frames through the gateway's own H.264 settings decode to the same pixels
    ref_mp4 = tmp_path / "ref.mp4"
    writer = Mp4Writer(ref_mp4, width=w, height=h, fps=16.0)
    for f in ref_u8:
        writer.write(f)
    writer.close()
    got, want = read_frames(out).astype(np.int16), read_frames(ref_mp4).astype(np.int16)
    assert got.shape == want.shape == (frames, h, w, 3)
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()
    mse = float(((got - ref_u8.astype(np.int16)) ** 2).mean())
    psnr = 10 * np.log10(255**2 / max(mse, 1e-9))
    print(f"mesh vs WanPipeline frames: PSNR {psnr:.1f} dB after H.264, mean abs diff "
          f"{np.abs(got - ref_u8).mean():.2f}")  # fmt: skip
    assert psnr > 25.0
    # the encoder and denoiser report the same encoder identity (they share the directory)
    d = WanModelDir.open(wan_dir)
    assert f"umt5@{d.identity('tokenizer', 'text_encoder')}"
