"""Model backends of the denoiser: the interface (base), the one sampler loop (loop), the embedded
default U-Net (default) and Wan from a diffusers-layout directory (wan, needs the `wan` extra)."""

from services.denoiser.backends.base import (
    DenoiseJob,
    ExpertInfo,
    FrameRule,
    ModelBackend,
    ModelSupport,
    SamplerState,
    SizeRule,
)

__all__ = [
    "DenoiseJob",
    "ExpertInfo",
    "FrameRule",
    "ModelBackend",
    "ModelSupport",
    "SamplerState",
    "SizeRule",
]
