"""Flow-matching schedules and samplers: small pure functions, one signature.

x_t = (1 - t) * x_0 + t * noise, the model predicts the velocity v = noise - x_0, and the
ODE runs from t = 1 (noise) to t = 0 (data). `model(x, t) -> v` is the only contract, so
the same loop runs in-process, on a Ray actor or behind gRPC.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def flow_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps+1 times from 1 to 0, warped by `shift` (>1 spends more steps at high noise, as SD3/Wan do)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


class SamplingCancelled(Exception):
    """Raised between steps when should_stop() turns true."""


def sample_euler(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    callback: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Euler ODE integration of the flow from timesteps[0] to timesteps[-1]."""
    total = len(timesteps) - 1
    for i in range(total):
        if should_stop is not None and should_stop():
            raise SamplingCancelled(f"stopped before step {i + 1} of {total}")
        t, t_next = float(timesteps[i]), float(timesteps[i + 1])
        v = model(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))
        x = x + (t_next - t) * v.to(x.dtype)
        if callback is not None:
            callback(i + 1, total, t)
    return x


def cfg_velocity(
    net: Callable[..., torch.Tensor],
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    guidance: Callable[[float], float],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap net(x, t, text, mask) into a classifier-free-guided model(x, t).

    Conditional and unconditional branches run as one batch of 2B. guidance(t) gives the
    scale at time t (it differs per expert).
    """
    (ct, cm), (ut, um) = cond, uncond
    length = max(ct.shape[1], ut.shape[1])
    ct, cm = pad_text(ct, cm, length)
    ut, um = pad_text(ut, um, length)
    text = torch.cat([ct, ut])
    mask = torch.cat([cm, um])

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = guidance(float(t[0]))
        if g == 1.0:
            return net(x, t, ct, cm)
        v = net(torch.cat([x, x]), torch.cat([t, t]), text, mask)
        vc, vu = v.chunk(2)
        return vu + g * (vc - vu)

    return model


def pad_text(text: torch.Tensor, mask: torch.Tensor, length: int):
    """Zero-pad text states (B, L, D) and mask (B, L) to `length` tokens."""
    if text.shape[1] == length:
        return text, mask
    pad = length - text.shape[1]
    text = torch.cat([text, text.new_zeros(text.shape[0], pad, text.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return text, mask
