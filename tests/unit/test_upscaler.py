"""Upscaler parts: SR network shape/identity at init, interpolation beats blending, streaming order."""

from dataclasses import replace

import numpy as np
import torch

from services.upscaler.interpolate import FlowInterpolator, linear_blend, output_positions
from services.upscaler.model import SR_MODELS, ResidualESPCN
from services.upscaler.upscaler import SpatialUpscaler, UpscalePlan, UpscalerSettings, upscale_stream
from videomesh.world import ClipSpec, render_clip


def test_sr_starts_as_bicubic_and_the_clamp_cuts_only_overshoot():
    x = torch.rand(2, 3, 8, 8)
    ref = torch.nn.functional.interpolate(x, scale_factor=8, mode="bicubic", align_corners=False)
    plain = ResidualESPCN(replace(SR_MODELS["x8"], antiring=0))
    assert plain(x).shape == (2, 3, 64, 64) and torch.allclose(plain(x), ref)
    # served: each output pixel within the range of the 3x3 input pixels around its own
    y = ResidualESPCN(SR_MODELS["x8"])(x).detach()
    xn = x.numpy()
    lo, hi = np.empty_like(ref.numpy()), np.empty_like(ref.numpy())
    for i in range(64):
        for j in range(64):
            win = xn[:, :, max(0, i // 8 - 1) : i // 8 + 2, max(0, j // 8 - 1) : j // 8 + 2]
            lo[:, :, i, j], hi[:, :, i, j] = win.min(axis=(2, 3)), win.max(axis=(2, 3))
    np.testing.assert_allclose(y.numpy(), np.clip(ref.numpy(), lo, hi), atol=1e-6)
    assert (ref.numpy() < lo - 1e-3).any() or (ref.numpy() > hi + 1e-3).any()  # bicubic did overshoot
    # a sharp edge: bicubic rings past both sides, the served output stays within them
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1.0
    ringing = torch.nn.functional.interpolate(edge, scale_factor=8, mode="bicubic", align_corners=False)
    assert ringing.min() < -0.01 and ringing.max() > 1.01
    out = ResidualESPCN(SR_MODELS["x8"])(edge).detach()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_output_positions_align_ends():
    p = output_positions(16, 96)
    assert p[0] == 0 and p[-1] == 15 and np.all(np.diff(p) > 0)


def test_flow_interpolation_beats_cross_fade_on_motion():
    clip = render_clip(ClipSpec("black", "circle", "red", "large", "right"), num_frames=9, height=128, width=128,
                       rng=np.random.default_rng(0))  # fmt: skip
    a, mid, b = clip[2], clip[3], clip[4]
    flow = FlowInterpolator().between(a, b, 0.5)
    blend = linear_blend(a, b, 0.5)
    err = lambda x: np.abs(x.astype(float) - mid).mean()  # noqa: E731
    assert err(flow) < 0.7 * err(blend)


def test_stream_yields_exact_count_in_order_with_bounded_input():
    frames = [np.full((8, 8, 3), i * 10, np.uint8) for i in range(5)]
    seen = []

    def source():
        for f in frames:
            seen.append(len(seen))
            yield f

    sr = SpatialUpscaler(UpscalerSettings(spatial="bicubic"))
    plan = UpscalePlan(input_frames=5, input_fps=4, width=16, height=16, output_frames=13, output_fps=12)
    out = []
    for o in upscale_stream(plan, source(), sr):
        out.append((len(seen), o))
    assert len(out) == 13
    # output frame j never waits for more input than it needs (streaming, not whole-clip)
    pos = output_positions(5, 13)
    for (consumed, _), p in zip(out, pos, strict=True):
        assert consumed <= int(np.ceil(p)) + 1


def test_training_learns_from_frame_pairs_and_cli_defaults_come_from_the_config(tmp_path, monkeypatch):
    from safetensors import safe_open

    from services.upscaler import train as sr_train
    from videomesh.weights import load_into

    monkeypatch.setattr(sr_train, "WEIGHTS_DIR", tmp_path)
    assert sr_train.main(["--model", "tiny", "--steps", "2", "--batch", "2"]) == 0
    with safe_open(str(tmp_path / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    defaults = sr_train.SRTrainConfig()
    assert (
        meta["steps"] == "2" and meta["lr"] == str(defaults.lr) and meta["temporal"] == str(defaults.temporal)
    )
    # the last layer starts at zero; two steps on pairs must move it (the loss reaches the network)
    net = ResidualESPCN(SR_MODELS["tiny"])
    load_into(net, tmp_path / "tiny.safetensors")
    assert net.tail.weight.abs().sum() > 0
