"""Motion-compensated frame interpolation with OpenCV's DIS optical flow.

For an output time a in (0, 1) between frames A and B, the flows from the intermediate
frame back to A and B are approximated from the two bidirectional flows (Super SloMo's
linear-motion approximation); A and B are warped to time a and blended with weights that
drop where a forward-backward consistency check says the pixel is occluded in that frame.

Everything runs in float32 through OpenCV kernels: the warps take one two-channel map (no
split x/y copies), the weighted blend is `cv2.blendLinear` on the uint8 frames, and the pixel
grid is built once per frame size.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

# DIS presets, by PSNR of frames rebuilt between two others (every other frame of 24-frame world
# clips; `make eval-upscaler` at 256x256) and time per flow at 256x256 on a 2-core CPU:
#             128x128   256x256   512x512   ms/flow (256)
#   medium    47.6 dB   49.2 dB   50.0 dB   3.9
#   fast      45.2      48.4      49.7      1.0
#   ultrafast 45.4      48.8      49.8      0.6
# Ultrafast works from a coarser finest scale: within 0.4 dB of medium from 256x256 up, 2.2 dB
# below it at 128x128, where medium's flow costs about a quarter of what it does at 256x256. `auto`
# picks medium below AUTO_ULTRAFAST_PIXELS and ultrafast from there. Larger motion between the two
# frames widens the gap (a pair 6 frames apart at 256x256: ultrafast 35.5 dB, medium 41.5 dB), more
# than the default model's 16-frame clips move between consecutive inputs; choose medium for that.
FLOW_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
FLOW_PRESET_CHOICES = ("auto", *FLOW_PRESETS)
DEFAULT_FLOW_PRESET = "auto"
AUTO_ULTRAFAST_PIXELS = 256 * 256

_REMAP = {"interpolation": cv2.INTER_LINEAR, "borderMode": cv2.BORDER_REPLICATE}


def validate_flow_preset(preset: str) -> None:
    if preset not in FLOW_PRESET_CHOICES:
        raise ValueError(f"flow_preset must be one of {', '.join(FLOW_PRESET_CHOICES)}; got {preset!r}")


def resolve_flow_preset(preset: str, height: int, width: int) -> str:
    """The DIS preset used for frames of this size (`auto`: by pixel count, see the table above)."""
    validate_flow_preset(preset)
    if preset != "auto":
        return preset
    return "ultrafast" if height * width >= AUTO_ULTRAFAST_PIXELS else "medium"


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> np.ndarray:
    """(h, w, 2) float32 pixel coordinates (x, y), read-only: shared by every interpolator."""
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    g = np.dstack([xs, ys])
    g.flags.writeable = False
    return g


def _warp(img: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Sample img at coords (h, w, 2) float32 absolute pixel positions."""
    return cv2.remap(img, coords, None, **_REMAP)


class FlowInterpolator:
    """Interpolates between consecutive frame pairs; caches the flows of the current pair.

    Each interpolator owns its DIS object (they are not thread-safe), so one per stream is
    safe with several streams running on different gRPC threads. The instance itself is for
    one thread at a time."""

    def __init__(self, occlusion_px: float = 1.0, flow_preset: str = DEFAULT_FLOW_PRESET):
        validate_flow_preset(flow_preset)
        self.occlusion_px = occlusion_px
        self.flow_preset = flow_preset
        self._dis: dict[str, cv2.DISOpticalFlow] = {}  # preset -> this interpolator's own DIS object
        # the pair itself is kept (not its ids): a freed frame's id can be reused by the next one
        self._pair: tuple[np.ndarray, np.ndarray] | None = None
        self._cache = None

    def _flow_engine(self, height: int, width: int) -> cv2.DISOpticalFlow:
        preset = resolve_flow_preset(self.flow_preset, height, width)
        dis = self._dis.get(preset)
        if dis is None:
            dis = self._dis[preset] = cv2.DISOpticalFlow_create(FLOW_PRESETS[preset])
        return dis

    def _visibility(self, fa: np.ndarray, fb: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """Following fa then fb should come back: 1 / (1 + (|error| / occlusion_px)^2)."""
        d = _warp(fb, cv2.add(grid, fa))
        d += fa
        e = d[..., 0] * d[..., 0]
        e += d[..., 1] * d[..., 1]
        e *= np.float32(1.0 / self.occlusion_px**2)
        e += np.float32(1.0)
        return cv2.divide(1.0, e)

    def _prepare(self, a: np.ndarray, b: np.ndarray):
        if self._pair is not None and self._pair[0] is a and self._pair[1] is b:
            return self._cache
        ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
        gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        dis = self._flow_engine(*ga.shape)
        f01 = dis.calc(ga, gb, None)
        f10 = dis.calc(gb, ga, None)
        grid = _grid(*a.shape[:2])
        vis0 = self._visibility(f01, f10, grid)  # visibility of A's pixels in B
        vis1 = self._visibility(f10, f01, grid)
        self._pair, self._cache = (a, b), (f01, f10, vis0, vis1, grid)
        return self._cache

    def between(self, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
        """Frame at fraction t of the way from a to b (uint8 RGB, same size)."""
        if t <= 1e-6:
            return a
        if t >= 1 - 1e-6:
            return b
        f01, f10, vis0, vis1, grid = self._prepare(a, b)
        m0 = cv2.addWeighted(f01, -(1 - t) * t, f10, t * t, 0.0)  # flow t -> 0
        m0 += grid
        m1 = cv2.addWeighted(f01, (1 - t) * (1 - t), f10, -t * (1 - t), 0.0)  # flow t -> 1
        m1 += grid
        va = _warp(vis0, m0)
        va *= np.float32(1 - t)
        vb = _warp(vis1, m1)
        vb *= np.float32(t)
        # (va * A' + vb * B') / (va + vb), rounded to uint8, in one OpenCV pass
        return cv2.blendLinear(_warp(a, m0), _warp(b, m1), va, vb)


def linear_blend(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """The baseline: a plain cross-fade."""
    return np.clip(a.astype(np.float32) * (1 - t) + b.astype(np.float32) * t + 0.5, 0, 255).astype(np.uint8)


def output_positions(input_frames: int, output_frames: int) -> np.ndarray:
    """Position of each output frame on the input timeline; first and last frames align."""
    if output_frames == 1 or input_frames == 1:
        return np.zeros(output_frames)
    return np.arange(output_frames) * (input_frames - 1) / (output_frames - 1)
