"""The default model's U-Net experts on another runtime (onnxruntime, TensorRT, torch.compile).

`accelerate_denoiser(model, runtime, cache_dir)` replaces each expert's forward in place, so
`model(x, t, text, mask, expert=e)` (the backend) and `model(x, t, text, mask)` (the reference
sampler) keep working unchanged. Each accelerated forward falls back to the expert's torch
forward when
- the expert's weights differ from the exported ones (a style adapter merged by AdapterSlot: the
  exported graph holds the base weights as constants), back on the fast path once they are
  restored bit for bit (`WeightGuard`);
- the frames' shape (T, C, H, W) is not the exported one (the model checks requests for its own
  size; batch and text length are dynamic).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from videomesh.accel import (
    UNET_DYNAMIC_AXES,
    UNET_INPUTS,
    WeightGuard,
    accelerate,
    check_runtime,
    compile_module,
    denoiser_example_inputs,
)

log = logging.getLogger("videomesh.denoiser")


class AcceleratedForward:
    """An expert's forward on `fast`, the torch forward where the fast one does not apply."""

    def __init__(
        self, expert: torch.nn.Module, fast, torch_forward, frame_shape: tuple[int, ...], runtime: str
    ):
        self.fast = fast
        self.torch_forward = torch_forward
        self.frame_shape = frame_shape
        self.runtime = runtime
        self.guard = WeightGuard(expert) if runtime in ("onnx", "tensorrt") else None
        self.fallbacks = 0

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if tuple(x.shape[1:]) == self.frame_shape and (self.guard is None or self.guard.unchanged()):
            return self.fast(x, t, text, mask)
        if not self.fallbacks:
            log.info("runtime=%s: a forward with changed weights (an adapter) or frames %s runs on torch",
                     self.runtime, tuple(x.shape[1:]))  # fmt: skip
        self.fallbacks += 1
        return self.torch_forward(x, t, text, mask)


def restore_denoiser(model) -> None:
    """Put every expert back on its torch forward."""
    for expert in model.experts.values():
        if isinstance(expert.__dict__.get("forward"), AcceleratedForward):
            del expert.forward


def accelerate_denoiser(
    model,
    runtime: str,
    cache_dir: str | Path | None = None,
    *,
    fp16: bool = False,
    threads: int = 0,
    max_batch: int = 16,
    max_text: int = 512,
    setting: str = "runtime",
) -> None:
    """Run each expert of `model` (a MoEDenoiser, weights loaded) on `runtime` (torch | onnx |
    tensorrt | compile), in place. onnx/tensorrt export each expert once to `cache_dir` (default
    videomesh.accel.default_cache_dir()), dynamic in batch and text length; tensorrt's profile
    covers batches 1..2*max_batch (CFG doubles a batch) and texts 1..max_text tokens, `fp16` lets
    it use fp16 kernels. ValueError naming `setting` where the runtime cannot run here."""
    check_runtime(runtime, setting)
    restore_denoiser(model)
    if runtime == "torch":
        return
    cfg = model.cfg
    u = cfg.unet
    frame_shape = (cfg.frames, u.channels, cfg.height, cfg.width)
    example = denoiser_example_inputs(cfg, batch=2, text_len=12)
    ranges = {
        "x": ((1, *frame_shape), (2, *frame_shape), (2 * max_batch, *frame_shape)),
        "t": ((1,), (2,), (2 * max_batch,)),
        "text": ((1, 1, u.text_dim), (2, 16, u.text_dim), (2 * max_batch, max_text, u.text_dim)),
        "mask": ((1, 1), (2, 16), (2 * max_batch, max_text)),
    }
    for name, expert in model.experts.items():
        torch_forward = expert.forward  # the class's forward, bound (no instance override: restored above)
        if runtime == "compile":
            fast = compile_module(torch_forward)
        else:
            fast = accelerate(
                expert,
                runtime,
                example,
                cache_dir,
                name=f"unet-{cfg.name}-{name}",
                input_names=UNET_INPUTS,
                output_names=["v"],
                dynamic_axes=UNET_DYNAMIC_AXES,
                shape_ranges=ranges,
                fp16=fp16,
                threads=threads,
                setting=setting,
            )
        if hasattr(fast, "fallback"):
            # a TensorRT engine hands inputs outside its shape profile to its fallback: the class's torch
            # forward, not the module (whose forward is about to be this wrapper: that would loop)
            fast.fallback = torch_forward
        expert.forward = AcceleratedForward(expert, fast, torch_forward, frame_shape, runtime)
    log.info("denoiser experts %s run on %s", ", ".join(model.experts), runtime)
