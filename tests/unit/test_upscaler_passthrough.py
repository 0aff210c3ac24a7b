"""Frames already at the delivered size and rate (Wan at its native 16 fps) pass the upscaler unchanged."""

import numpy as np

from services.upscaler.upscaler import SpatialUpscaler, UpscalePlan, UpscalerSettings, upscale_stream


def test_native_size_and_rate_pass_through_unchanged():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(9)]
    plan = UpscalePlan(input_frames=9, input_fps=16, width=64, height=48, output_frames=9, output_fps=16)
    out = list(upscale_stream(plan, iter(frames), SpatialUpscaler(UpscalerSettings(spatial="bicubic"))))
    assert len(out) == 9 and all(a is b for a, b in zip(out, frames, strict=True))  # the same arrays


def test_16_to_24_fps_interpolates_between_the_native_frames():
    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(9)]
    plan = UpscalePlan(input_frames=9, input_fps=16, width=64, height=48, output_frames=13, output_fps=24)
    out = list(upscale_stream(plan, iter(frames), SpatialUpscaler(UpscalerSettings(spatial="bicubic"))))
    assert len(out) == 13
    assert np.array_equal(out[0], frames[0]) and np.array_equal(out[-1], frames[-1])
    assert 0 < out[1].mean() < 10  # between frames 0 and 1 (position 2/3)
