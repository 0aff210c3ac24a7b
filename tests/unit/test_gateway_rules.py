"""The gateway validates a rule-publishing backend (wan2.2) by its ModelInfo rules, and tiers by pixels
and frames; the default model keeps the gateway's own lists. No service runs here."""

from __future__ import annotations

import pytest

from gateway.gateway import GatewaySettings, VideoGateway
from gateway.rules import (
    check_frames,
    check_size,
    largest_count_at_most,
    nearest_count,
    output_frames,
    rule_driven,
)
from gateway.tiers import TierPolicy, tiers_from
from videomesh.errors import InvalidArgument
from videomesh.v1 import common_pb2, denoiser_pb2

OFFICIAL = [(1280, 720), (720, 1280), (832, 480), (480, 832)]


def wan_info(**kw) -> denoiser_pb2.ModelInfo:
    """What a Wan2.2 T2V-A14B denoiser publishes (sizes any multiple of 16 up to 2048, frames 4k+1)."""
    size = lambda w, h: common_pb2.Size(width=w, height=h)  # noqa: E731
    m = denoiser_pb2.ModelInfo(
        name="wan2.2-t2v-a14b", version="abc", backend="wan2.2", upscale=False, fps=16.0,
        sizes=[size(*s) for s in OFFICIAL], frame_counts=[81], languages=["en", "zh", "ja"],
        default_steps=40, max_steps=200, encoder_model="umt5@x", text_length=512, text_dim=4096,
        experts=[denoiser_pb2.ExpertInfo(name="high_noise", boundary=0.875, default_guidance=4.0),
                 denoiser_pb2.ExpertInfo(name="low_noise", boundary=0.875, default_guidance=3.0)],
        size_rule=denoiser_pb2.SizeRule(official=[size(*s) for s in OFFICIAL], multiple=16, min_side=16,
                                        max_side=2048, default_size=size(1280, 720)),
        frame_rule=denoiser_pb2.FrameRule(counts=[81], step=4, min_frames=1, max_frames=161, default_frames=81),
    )  # fmt: skip
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def default_info() -> denoiser_pb2.ModelInfo:
    return denoiser_pb2.ModelInfo(
        name="default", version="v", sizes=[common_pb2.Size(width=32, height=32)], frame_counts=[16], fps=4.0,
        languages=["en", "zh", "ja"], default_steps=20, max_steps=100, encoder_model="default@x",
        backend="default", upscale=True,
    )  # fmt: skip


@pytest.fixture
def gw(tmp_path):
    g = VideoGateway(GatewaySettings(data_dir=tmp_path))
    g.model = wan_info()
    yield g
    g.close()


def _violations(gw, policy=None, **spec):
    with pytest.raises(InvalidArgument) as err:
        gw.normalize(common_pb2.VideoSpec(prompt="a cat", **spec), policy)
    return dict(err.value.violations) if err.value.violations else {}, err.value.message


# --- the rules as pure functions ---------------------------------------------------------------------------


def test_rule_driven_is_only_a_backend_that_publishes_rules_and_generates_at_size():
    assert rule_driven(wan_info())
    assert not rule_driven(default_info())
    assert not rule_driven(denoiser_pb2.ModelInfo(name="old"))  # an older denoiser publishes no backend
    assert not rule_driven(wan_info(upscale=True))


def test_size_rule_names_the_multiple_and_the_nearest_sizes():
    r = wan_info().size_rule
    assert check_size(1280, 720, r) == [] and check_size(1024, 576, r) == []
    (msg,) = check_size(1000, 576, r)
    assert msg.startswith("width 1000 is not a multiple of 16 — use 992 or 1008")
    assert check_size(2064, 720, r)[0].startswith("width 2064 is outside 16..2048")
    no_multiple = denoiser_pb2.SizeRule(official=r.official)
    assert "choose one of 1280x720, 720x1280, 832x480, 480x832" in check_size(1024, 576, no_multiple)[0]


def test_frame_rule_names_4k_plus_1_and_the_nearest_count():
    r = wan_info().frame_rule
    assert check_frames(81, r) == "" and check_frames(1, r) == ""
    assert check_frames(80, r) == "num_frames must be 4k+1 for this model; got 80 — use 81"
    assert check_frames(79, r).endswith("use 77 or 81")
    assert "1..161" in check_frames(165, r)
    assert [nearest_count(x, r) for x in (80, 79, 0, 5 * 16, 1000)] == [81, 81, 1, 81, 161]
    assert [largest_count_at_most(x, r) for x in (81, 80, 1, 1000)] == [81, 77, 1, 161]


def test_output_frames_keep_the_clips_span_when_interpolating():
    assert output_frames(81, 16, 16) == 81
    assert output_frames(81, 16, 24) == 121  # 5 s at 24 fps, first and last frames aligned
    assert output_frames(1, 16, 24) == 1


# --- VideoGateway.normalize / plan for a Wan backend --------------------------------------------------------


def test_defaults_are_the_backends_own(gw):
    out = gw.normalize(common_pb2.VideoSpec(prompt="a cat"))
    assert (out.width, out.height, out.fps, out.num_frames) == (1280, 720, 16.0, 81)
    assert out.duration_seconds == pytest.approx(81 / 16) and out.num_steps == 40
    plan = gw.plan(out)
    assert (plan.base_width, plan.base_height, plan.base_frames, plan.base_fps) == (1280, 720, 81, 16.0)
    assert (plan.width, plan.height, plan.frames, plan.fps) == (1280, 720, 81, 16.0)


def test_any_multiple_of_16_and_frames_from_num_frames_or_duration(gw):
    out = gw.normalize(common_pb2.VideoSpec(prompt="a cat", width=1024, height=576, num_frames=33))
    assert (out.width, out.height, out.num_frames) == (1024, 576, 33)
    out = gw.normalize(common_pb2.VideoSpec(prompt="a cat", duration_seconds=3.0))
    assert out.num_frames == 49  # 48 frames at 16 fps -> the nearest 4k+1
    out = gw.normalize(common_pb2.VideoSpec(prompt="a cat", fps=24, guidance_scale=5, guidance_scale_2=2.5))
    plan = gw.plan(out)
    assert (plan.fps, plan.frames, plan.base_frames, plan.guidance, plan.guidance_2) == (
        24.0,
        121,
        81,
        5.0,
        2.5,
    )


@pytest.mark.parametrize(
    "spec, field, words",
    [
        ({"num_frames": 80}, "spec.num_frames", "num_frames must be 4k+1 for this model; got 80 — use 81"),
        (
            {"width": 1000, "height": 576},
            "spec.width",
            "width 1000 is not a multiple of 16 — use 992 or 1008",
        ),
        ({"width": 1024, "height": 570}, "spec.height", "height 570 is not a multiple of 16 — use 576"),
        ({"width": 1024}, "spec.width", "give both width and height"),
        ({"width": 2048, "height": 2064}, "spec.height", "height 2064 is outside 16..2048"),
        ({"fps": 30}, "spec.fps", "choose 16 (native) or 24 (interpolated)"),
        ({"num_frames": 81, "duration_seconds": 2}, "spec.duration_seconds", "give one of them"),
        ({"guidance_scale_2": 31}, "spec.guidance_scale_2", "0..30"),
        ({"image": common_pb2.Image(data=b"x", mime_type="image/png")}, "spec.image", "not served yet"),
    ],
)
def test_bad_specs_name_the_rule(gw, spec, field, words):
    violations, message = _violations(gw, **spec)
    assert words in violations[field], violations


def test_guidance_2_needs_two_experts(gw):
    gw.model = wan_info()
    del gw.model.experts[1]
    violations, _ = _violations(gw, guidance_scale_2=3.0)
    assert "this model has one expert" in violations["spec.guidance_scale_2"]


def test_tier_limits_in_pixels_and_frames_apply_to_any_backend(gw):
    small = TierPolicy("small", 10, 5, 1, 10, 10, 5, max_pixels=832 * 480, max_frames=49)
    out = gw.normalize(common_pb2.VideoSpec(prompt="a cat"), small)
    assert (out.width, out.height, out.num_frames) == (832, 480, 49)  # the defaults shrink to fit
    violations, _ = _violations(gw, small, width=1280, height=720, num_frames=81)
    assert (
        "allows up to 399360" in violations["spec.width"]
        and "e.g. 832x480, 480x832" in violations["spec.width"]
    )
    assert (
        "81 frames is more than the small tier allows per clip (49) — use 49" in violations["spec.num_frames"]
    )


def test_tier_settings_read_the_new_limits():
    t = tiers_from({"free": {"max_pixels": 409600, "max_frames": 49}})["free"]
    assert (t.max_pixels, t.max_frames, t.priority) == (409600, 49, 10)
    with pytest.raises(ValueError, match="max_pixels"):
        GatewaySettings(tiers={"free": {"max_pixels": -1}}).validate()


# --- the default model: the gateway's lists, exactly as before ------------------------------------------------


def test_the_default_model_keeps_the_gateways_sizes_and_clip_length(gw):
    gw.model = default_info()
    out = gw.normalize(common_pb2.VideoSpec(prompt="a cat"))
    assert (out.width, out.height, out.fps, out.num_frames) == (256, 256, 24.0, 0)
    assert out.duration_seconds == 4.0
    plan = gw.plan(out)
    assert (plan.base_width, plan.base_frames, plan.frames, plan.guidance_2) == (32, 16, 96, 0.0)
    violations, _ = _violations(gw, width=1024, height=576)
    assert violations["spec.width"].startswith("size 1024x576 is not offered; choose one of 256x256")
    violations, _ = _violations(gw, num_frames=81)
    assert "generates 16 frames" in violations["spec.num_frames"]
    tight = TierPolicy("tight", 10, 5, 1, 10, 10, 5, max_pixels=128 * 128)
    violations, _ = _violations(gw, tight)
    assert "the tight tier allows up to 16384" in violations["spec.width"]


def test_split_rows_slices_bytes_and_keeps_bf16():
    import torch

    from videomesh import codec

    t = torch.randn(2, 3, 4).to(torch.bfloat16)
    rows = codec.split_rows(codec.to_proto(t))
    assert [r.dtype for r in rows] == [common_pb2.DTYPE_BFLOAT16] * 2
    assert all(torch.equal(codec.to_torch(r), t[i : i + 1]) for i, r in enumerate(rows))
    bad = codec.to_proto(t)
    bad.data = bad.data[:-2]
    with pytest.raises(InvalidArgument, match="needs 48 bytes"):
        codec.split_rows(bad)
    with pytest.raises(InvalidArgument, match="cannot split"):
        codec.split_rows(common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[], data=b"\0\0\0\0"))


def test_step_cache_from_the_request_or_the_tier(gw):
    import dataclasses

    from gateway.tiers import DEFAULT_TIERS

    assert gw.normalize(common_pb2.VideoSpec(prompt="a cat")).step_cache == 0.0  # off by default
    fast = dataclasses.replace(DEFAULT_TIERS["free"], step_cache=0.1)
    assert gw.normalize(common_pb2.VideoSpec(prompt="a cat"), fast).step_cache == pytest.approx(0.1)
    # the request's own value wins, 0 included
    assert gw.normalize(common_pb2.VideoSpec(prompt="a cat", step_cache=0.0), fast).step_cache == 0.0
    assert gw.normalize(
        common_pb2.VideoSpec(prompt="a cat", step_cache=0.2), fast
    ).step_cache == pytest.approx(0.2)
    for bad in (-1.0, 2.0, float("inf")):
        assert "spec.step_cache" in _violations(gw, step_cache=bad)[0]


def test_a_tier_step_cache_out_of_range_fails_at_start():
    assert tiers_from({"pro": {"step_cache": 0.1}})["pro"].step_cache == 0.1
    with pytest.raises(ValueError, match="tiers.pro.step_cache must be in 0..1"):
        tiers_from({"pro": {"step_cache": 3}})


def test_the_spec_policy_runs_without_a_gateway_or_a_denoiser(tmp_path):
    """gateway/policy.py: normalise and plan from the settings, the tier and published rules alone."""
    import grpc as grpc_

    from gateway.policy import ModelRules, SpecPolicy
    from gateway.templates import TemplateLibrary

    settings = GatewaySettings(data_dir=tmp_path)
    calls = []

    class Down(grpc_.RpcError):
        def details(self):
            return "down"

    def fetch():
        calls.append(1)
        raise Down()

    rules = ModelRules(fetch, refresh_seconds=60)
    spec_policy = SpecPolicy(settings, tiers_from(None), TemplateLibrary.load(settings.templates_file), rules)
    with pytest.raises(Exception, match="still starting"):
        spec_policy.normalize(common_pb2.VideoSpec(prompt="a cat"))
    rules.set(wan_info())
    out = spec_policy.normalize(common_pb2.VideoSpec(prompt="  a cat  "), spec_policy.policy("pro"))
    assert out.prompt == "a cat" and out.width and out.num_frames and out.seed
    plan = spec_policy.plan(out)
    assert (plan.base_width, plan.base_height, plan.base_frames) == (out.width, out.height, out.num_frames)
    rules.read_at = 0.0
    rules.refresh()  # a failed read keeps what it had, and is not retried within refresh_seconds
    rules.refresh()
    assert rules.info == wan_info() and len(calls) == 1
