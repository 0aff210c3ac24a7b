"""Upscaler parts: SR network shape/identity at init, interpolation beats blending, streaming order."""

import numpy as np
import torch

from services.upscaler.interpolate import FlowInterpolator, linear_blend, output_positions
from services.upscaler.model import SR_MODELS, ResidualESPCN
from services.upscaler.upscaler import SpatialUpscaler, UpscalePlan, UpscalerSettings, upscale_stream
from videomesh.world import ClipSpec, render_clip


def test_sr_starts_as_bicubic():
    net = ResidualESPCN(SR_MODELS["x8"])
    x = torch.rand(2, 3, 8, 8)
    y = net(x)
    ref = torch.nn.functional.interpolate(x, scale_factor=8, mode="bicubic", align_corners=False)
    assert y.shape == (2, 3, 64, 64) and torch.allclose(y, ref)


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
