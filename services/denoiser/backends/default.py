"""The embedded default model as a ModelBackend: the pixel-space MoE U-Net, flow matching, Euler.

Wraps a loaded DenoiserEngine (weights, device, precision, style adapters) and computes exactly
what DenoiserEngine.generate computes, step for step: the same noise, the same warped timesteps,
the text padded the way cfg_velocity pads it, the CFG branches in one batch, the same Euler
update and the same uint8 conversion (tests/unit/test_backends.py checks it bit for bit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.denoiser.backends.base import (
    DenoiseJob,
    ExpertInfo,
    FrameRule,
    ModelBackend,
    ModelSupport,
    SamplerState,
    SizeRule,
    check_guidance,
)
from services.denoiser.sampling import flow_timesteps, pad_text
from videomesh.errors import InvalidArgument, Unavailable


@dataclass
class _State(SamplerState):
    timesteps: torch.Tensor = None  # (steps + 1,) from 1 to 0
    text: torch.Tensor = None  # (1, L, D) float on the model's device
    mask: torch.Tensor = None
    negative: torch.Tensor = None
    negative_mask: torch.Tensor = None

    @property
    def t(self) -> float:
        return float(self.timesteps[self.step])


class DefaultBackend(ModelBackend):
    kind = "default"  # ModelInfo.backend

    def __init__(self, engine):
        self.engine = engine  # services.denoiser.engine.DenoiserEngine, loaded
        self.name = engine.cfg.name
        # name -> the style adapter a forward merges: the engine's installed files here; a Ray shard
        # sets its own lookup (adapters reach shards through the object store, not their disks)
        self.adapter_for: Callable[[str], object] = engine.adapter

    def supports(self) -> ModelSupport:
        e, cfg = self.engine, self.engine.cfg
        return ModelSupport(
            name=cfg.name,
            version=e.version,
            sizes=SizeRule(official=((cfg.width, cfg.height),)),
            frames=FrameRule(counts=(cfg.frames,)),
            fps=cfg.fps,
            languages=tuple(cfg.languages),
            experts=(
                ExpertInfo("high_noise", cfg.boundary, cfg.guidance_high, "experts.high_noise"),
                ExpertInfo("low_noise", cfg.boundary, cfg.guidance_low, "experts.low_noise"),
            ),
            text_dim=cfg.unet.text_dim,
            text_length=0,
            encoder=e.encoder_model,
            default_steps=cfg.steps,
            max_steps=cfg.max_steps,
            default_size=(cfg.width, cfg.height),
            default_frames=cfg.frames,
        )

    def check_request(self, job: DenoiseJob, encoder_model: str = "") -> None:
        self.engine.check(job, encoder_model)
        check_guidance(job.guidance_2, "guidance_scale_2")
        if job.image is not None:
            raise InvalidArgument("image: this model generates from text only", field="image")

    def _guidance(self, job: DenoiseJob, expert: str) -> float:
        if expert == "low_noise" and job.guidance_2:
            return job.guidance_2
        return job.guidance or self.engine.cfg.guidance_for(expert)

    def start(self, job: DenoiseJob) -> _State:
        e = self.engine
        if e.model is None:
            raise Unavailable("the denoiser is still loading its model; retry shortly", retry_after=2.0)
        dev = e.device
        # as cfg_velocity: both texts padded to the longer one, also for a g == 1 step
        ct, cm = job.text.to(dev).float(), job.text_mask.to(dev)
        ut, um = job.negative.to(dev).float(), job.negative_mask.to(dev)
        length = max(ct.shape[1], ut.shape[1])
        ct, cm = pad_text(ct, cm, length)
        ut, um = pad_text(ut, um, length)
        return _State(
            job=job,
            latents=e.initial_noise(job).to(dev),
            total=job.steps,
            timesteps=flow_timesteps(job.steps, e.cfg.shift),
            text=ct,
            mask=cm,
            negative=ut,
            negative_mask=um,
        )

    def expert_for(self, state: _State) -> str:
        return self.engine.cfg.expert_for(state.t)

    def batch_key(self, state: _State) -> Hashable:
        expert = self.expert_for(state)
        guided = self._guidance(state.job, expert) != 1.0
        return (expert, tuple(state.latents.shape[1:]), state.job.adapter, state.job.adapter_strength, guided)

    def forward(self, expert: str, states: Sequence[_State]) -> list[torch.Tensor]:
        e = self.engine
        x = torch.cat([s.latents for s in states])
        t = torch.cat([torch.full((1,), s.t, dtype=torch.float32, device=x.device) for s in states])
        g = [self._guidance(s.job, expert) for s in states]
        guided = g[0] != 1.0  # one value per batch (batch_key)
        length = max(s.text.shape[1] for s in states)
        texts = [pad_text(s.text, s.mask, length) for s in states]
        if guided:
            texts += [pad_text(s.negative, s.negative_mask, length) for s in states]
            x, t = torch.cat([x, x]), torch.cat([t, t])
        text = torch.cat([tx for tx, _ in texts])
        mask = torch.cat([m for _, m in texts])
        job = states[0].job  # one adapter per batch (batch_key)
        with e._lock, torch.inference_mode():
            e._slot.use(self.adapter_for(job.adapter) if job.adapter else None, job.adapter_strength)
            with e._autocast():
                v = e.model(x, t, text, mask, expert=expert).float()
        if not guided:
            return list(v.split(1))
        vc, vu = v.chunk(2)
        n = len(states)
        return [vu[i : i + 1] + g[i] * (vc[i : i + 1] - vu[i : i + 1]) for i in range(n)]

    def step(self, state: _State, prediction: torch.Tensor) -> float:
        t, t_next = state.t, float(state.timesteps[state.step + 1])
        state.latents = state.latents + (t_next - t) * prediction.to(state.latents.dtype)
        state.step += 1
        return t

    def remote_state(self, state: _State) -> _State:
        # the padded text is in the state already; the job's own copy stays here
        empty = torch.empty(0)
        job = dataclasses.replace(state.job, text=empty, text_mask=empty, negative=empty, negative_mask=empty)
        return dataclasses.replace(state, latents=None, experts_used=[], job=job, cache=None)

    def parameters(self, expert: str) -> int:
        from services.denoiser.model import count_parameters

        model = self.engine.model
        return count_parameters(model.experts[expert]) if model is not None and expert in model.experts else 0

    def decode(self, state: _State) -> Iterator[np.ndarray]:
        frames = ((state.latents[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (T, C, H, W)
        yield frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
