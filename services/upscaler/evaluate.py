"""`make eval-upscaler`: learned SR vs bicubic and Lanczos, flow interpolation vs blending,
flicker, and throughput — all measured side by side in one run."""

from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio as psnr
from skimage.metrics import structural_similarity as ssim

from services.upscaler.interpolate import (
    DEFAULT_FLOW_PRESET,
    FLOW_PRESET_CHOICES,
    FlowInterpolator,
    linear_blend,
)
from services.upscaler.train import degrade, natural_images
from services.upscaler.upscaler import SpatialUpscaler, UpscalePlan, UpscalerSettings, upscale_stream
from videomesh.world import CORE_MOTIONS, render_clip, sample_spec


def _metrics(ref, out):
    return psnr(ref, out, data_range=255), ssim(ref, out, channel_axis=-1, data_range=255)


def spatial_table(sr: SpatialUpscaler, seed: int, n_world: int = 24) -> dict:
    rng = np.random.default_rng(10_000 + seed)  # held out: training used seed 0's stream
    scale = 8
    sets = {"world": [], "natural": []}
    for _ in range(n_world):
        hr = render_clip(sample_spec(rng, CORE_MOTIONS), num_frames=2, height=256, width=256, rng=rng,
                         texture=bool(rng.random() < 0.5))[0]  # fmt: skip
        sets["world"].append(hr)
    img = natural_images("heldout")[0]
    for y in range(0, img.shape[0] - 255, 128):
        for x in range(0, img.shape[1] - 255, 128):
            sets["natural"].append(np.ascontiguousarray(img[y : y + 256, x : x + 256]))
    table = {}
    for name, hrs in sets.items():
        rows = {"learned": [], "bicubic": [], "lanczos": []}
        for hr in hrs:
            lr = degrade(hr, scale, rng)
            rows["learned"].append(_metrics(hr, sr(lr, 256, 256)))
            rows["bicubic"].append(_metrics(hr, cv2.resize(lr, (256, 256), interpolation=cv2.INTER_CUBIC)))
            rows["lanczos"].append(_metrics(hr, cv2.resize(lr, (256, 256), interpolation=cv2.INTER_LANCZOS4)))
        table[name] = {k: tuple(np.mean(v, axis=0)) for k, v in rows.items()} | {"n": len(hrs)}
    return table


def interpolation_table(seed: int, n: int = 12, flow_preset: str = DEFAULT_FLOW_PRESET, gap: int = 2) -> dict:
    """Drop the frames between every `gap`-th frame of 24-frame clips and rebuild them from their
    neighbours (gap 2: every other frame, the default model's motion per input frame or more)."""
    rng = np.random.default_rng(20_000 + seed)
    flow, blend = [], []
    for _ in range(n):
        moving = ("left", "right", "up", "down")  # a still clip is trivially rebuilt by any method
        clip = render_clip(sample_spec(rng, moving), num_frames=24, height=256, width=256, rng=rng,
                           texture=bool(rng.random() < 0.5))  # fmt: skip
        interp = FlowInterpolator(flow_preset=flow_preset)
        for i in range(gap, 24, gap):
            a, b = clip[i - gap], clip[i]
            for k in range(1, gap):
                t = k / gap
                flow.append(psnr(clip[i - gap + k], interp.between(a, b, t), data_range=255))
                blend.append(psnr(clip[i - gap + k], linear_blend(a, b, t), data_range=255))
    return {"flow": float(np.mean(flow)), "blend": float(np.mean(blend)), "frames": len(flow)}


def flicker_and_throughput(sr: SpatialUpscaler, seed: int, n: int = 6) -> dict:
    rng = np.random.default_rng(30_000 + seed)
    ours, bic, fps = [], [], []
    for _ in range(n):
        base = render_clip(sample_spec(rng, CORE_MOTIONS), num_frames=16, height=32, width=32, rng=rng)
        plan = UpscalePlan(
            input_frames=16, input_fps=4, width=256, height=256, output_frames=96, output_fps=24
        )
        t0 = time.perf_counter()
        out = np.stack(list(upscale_stream(plan, iter(base), sr)))
        fps.append(len(out) / (time.perf_counter() - t0))
        # flicker of the spatial stage itself: the same 16 frames, SR vs bicubic, frame-to-frame change
        sr_frames = np.stack([sr(f, 256, 256) for f in base]).astype(np.float32)
        bicubic_in = np.stack(
            [cv2.resize(f, (256, 256), interpolation=cv2.INTER_CUBIC) for f in base]
        ).astype(np.float32)
        ours.append(np.abs(np.diff(sr_frames, axis=0)).mean())
        bic.append(np.abs(np.diff(bicubic_in, axis=0)).mean())
    return {
        "flicker_ours": float(np.mean(ours)),
        "flicker_bicubic": float(np.mean(bic)),
        "fps": float(np.median(fps)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval-upscaler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flow-preset", choices=list(FLOW_PRESET_CHOICES), default=DEFAULT_FLOW_PRESET)
    a = p.parse_args(argv)
    sr = SpatialUpscaler(UpscalerSettings(spatial="learned"))
    sr.load()
    sp = spatial_table(sr, a.seed)
    ok = True
    print(f"spatial x8 ({sr.name}): PSNR dB / SSIM on held-out inputs")
    print(f"{'set':<8} {'n':>3} {'learned':>16} {'bicubic':>16} {'lanczos':>16}  gain vs bicubic")
    for name, r in sp.items():
        gain = r["learned"][0] - r["bicubic"][0]
        print(f"{name:<8} {r['n']:>3} " + " ".join(f"{r[k][0]:>8.2f} / {r[k][1]:.3f}" for k in ("learned", "bicubic", "lanczos"))
              + f"  {gain:+.2f} dB")  # fmt: skip
        ok &= gain >= (1.5 if name == "world" else 0.0)
    it = interpolation_table(a.seed, flow_preset=a.flow_preset)
    print(f"interpolation (every other frame dropped, {it['frames']} frames): flow ({a.flow_preset}) {it['flow']:.2f} dB "
          f"vs blend {it['blend']:.2f} dB")  # fmt: skip
    ok &= it["flow"] > it["blend"]
    far = interpolation_table(a.seed, flow_preset=a.flow_preset, gap=6)
    print(f"  larger motion (5 of every 6 frames dropped, {far['frames']} frames): flow {far['flow']:.2f} dB "
          f"vs blend {far['blend']:.2f} dB")  # fmt: skip
    ft = flicker_and_throughput(sr, a.seed)
    ratio = ft["flicker_ours"] / ft["flicker_bicubic"]
    print(f"flicker (mean |Δ| between consecutive frames): ours {ft['flicker_ours']:.3f} vs bicubic input {ft['flicker_bicubic']:.3f} "
          f"(ratio {ratio:.3f}, limit 1.05)")  # fmt: skip
    ok &= ratio <= 1.05
    print(
        f"throughput: {ft['fps']:.0f} output frames/s at 256x256 (16 frames 32x32 @4 fps -> 96 frames @24 fps)"
    )
    print(f"targets: {'MET' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
