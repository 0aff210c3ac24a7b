"""The model-backend interface: everything the sampler loop and the service need from a model.

A backend says what it supports (sizes, frame counts, fps, languages, experts, text length, the
encoder it needs), checks a request, makes a request's initial noise and sampler state, says which
expert a step uses, runs one batched forward for a group of requests (the CFG conditional and
unconditional branches in the same batch), applies the sampler step, and decodes latents to uint8
frames. The one sampler loop (`backends.loop`) drives any backend; executors only decide where
the forwards run.

The per-request state is the backend's own (`SamplerState` subclasses): a multistep scheduler
keeps history per request, so nothing that advances is shared between requests.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from videomesh.errors import InvalidArgument


@dataclass
class DenoiseJob:
    """One generation request as the denoiser sees it (text already encoded)."""

    text: torch.Tensor  # (1, L, D)
    text_mask: torch.Tensor  # (1, L) bool
    negative: torch.Tensor
    negative_mask: torch.Tensor
    frames: int
    height: int
    width: int
    seed: int
    steps: int
    guidance: float  # 0 = the per-expert defaults
    adapter: str = ""  # a brand style adapter (LoRA) by name; "" = the base model
    adapter_strength: float = 1.0  # how much of the adapter's delta is added (0 < s <= 2)
    # the low-noise expert's scale; 0 = `guidance` when that is set (as WanPipeline's guidance_scale_2
    # defaults to guidance_scale), else the model's default for that expert
    guidance_2: float = 0.0
    # reserved for image-to-video (Wan2.2-I2V-A14B, TI2V-5B with an image): (3, H, W) uint8; not served yet
    image: torch.Tensor | None = None
    # step caching: reuse an expert's last prediction while the model's input has changed by less than
    # this (relative L1) since that prediction was computed; 0 = off (see StepCache)
    step_cache: float = 0.0


@dataclass(frozen=True)
class ExpertInfo:
    name: str  # what progress events and placement call it ("high_noise", "low_noise", "transformer")
    # this expert runs the steps with t >= boundary (high noise) or t < boundary (low noise); t in [0, 1]
    boundary: float
    default_guidance: float
    component: str = ""  # where its weights are (a diffusers subfolder or a module path)


def _nearest(value: int, candidates: list[int]) -> str:
    """The candidate nearest to value ("77 or 81" on a tie)."""
    best = min(abs(v - value) for v in candidates)
    return " or ".join(str(v) for v in sorted({v for v in candidates if abs(v - value) == best}))


@dataclass(frozen=True)
class SizeRule:
    """Which frame sizes a model generates: any multiple of `multiple` within the side limits, or,
    when multiple is 0, only the listed ones. `official` are the sizes it was trained at."""

    official: tuple[tuple[int, int], ...]  # (width, height)
    multiple: int = 0
    min_side: int = 0
    max_side: int = 0
    why: str = ""  # what the multiple comes from, for the error message

    def check(self, width: int, height: int) -> None:
        if not self.multiple:
            if (width, height) not in self.official:
                sizes = ", ".join(f"{w}x{h}" for w, h in self.official)
                raise InvalidArgument(
                    f"size: this model generates {sizes}; got {width}x{height}", field="width"
                )
            return
        m = self.multiple
        for name, v in (("width", width), ("height", height)):
            if v % m:
                lo, hi = max(m, v // m * m), v // m * m + m
                raise InvalidArgument(
                    f"{name} must be a multiple of {m} for this model{f' ({self.why})' if self.why else ''}; "
                    f"got {v} — use {_nearest(v, [lo, hi])}",
                    field=name,
                )
            if v < self.min_side or (self.max_side and v > self.max_side):
                raise InvalidArgument(
                    f"{name} must be in {self.min_side}..{self.max_side}; got {v}", field=name
                )


@dataclass(frozen=True)
class FrameRule:
    """Which frame counts a model generates: step*k + 1 within the limits (a causal VAE of temporal
    stride `step`), or, when step is 0, only the listed counts."""

    counts: tuple[int, ...]  # the fixed counts (step 0) or the official ones
    step: int = 0
    min_frames: int = 1
    max_frames: int = 0
    why: str = ""

    def check(self, frames: int) -> None:
        if not self.step:
            if frames not in self.counts:
                raise InvalidArgument(
                    f"num_frames: this model generates {' or '.join(map(str, self.counts))} frames; got {frames}",
                    field="num_frames",
                )
            return
        s = self.step
        if frames % s != 1 % s:
            lo = max(1, (frames - 1) // s * s + 1)
            raise InvalidArgument(
                f"num_frames must be {s}k+1 for this {self.why or 'model'}; got {frames} — use "
                f"{_nearest(frames, [lo, lo + s])}",
                field="num_frames",
            )
        if frames < self.min_frames or (self.max_frames and frames > self.max_frames):
            raise InvalidArgument(
                f"num_frames must be in {self.min_frames}..{self.max_frames}; got {frames}",
                field="num_frames",
            )


@dataclass(frozen=True)
class ModelSupport:
    """What a backend generates and needs: GetModelInfo publishes it, the gateway validates by it."""

    name: str
    version: str
    sizes: SizeRule
    frames: FrameRule
    fps: float  # native frame rate
    languages: tuple[str, ...]
    experts: tuple[ExpertInfo, ...]
    text_dim: int  # width of the text states the encoder must send
    text_length: int  # tokens the text states must have (zero-padded); 0 = any length with a mask
    encoder: str  # the text encoder this model was trained with ("<name>@<version>")
    default_steps: int
    max_steps: int
    default_size: tuple[int, int]  # (width, height)
    default_frames: int


MAX_STEP_CACHE = 1.0  # a threshold above this would reuse nearly every step


@dataclass
class StepCache:
    """Step caching for one request (TeaCache / First-Block-Cache style, at the model's boundary).

    For each expert it keeps the model input (the latents) and the prediction of the last step
    that expert computed. A step whose input differs from that input by less than `threshold`
    (mean |x - x_ref| / mean |x_ref|, the relative L1 distance TeaCache and FBCache gate on)
    reuses the prediction instead of running the forward; otherwise it runs and becomes the new
    reference. The distance is always to the last computed input, so reused steps add up until
    the input has moved far enough. An expert's first step and the request's last step always run.

    State lives in the request (SamplerState.cache), so nothing is shared between requests, and
    is keyed by expert, so the high-noise expert's output is never reused for a low-noise step.
    The CFG branches: the prediction kept is the guided one, vu + g (vc - vu), with the expert's
    fixed scale g; both branches see the same input, so the gate skips or runs them together,
    and keeping (vc, vu) apart would give the same step bit for bit. Runs wherever the loop runs
    (in process or driving Ray shards): a reused step sends nothing to a shard.
    """

    threshold: float
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # expert -> latents it last saw
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # expert -> its prediction then
    computed: int = 0
    reused: int = 0

    def lookup(self, expert: str, latents: torch.Tensor, last: bool) -> torch.Tensor | None:
        ref = self.inputs.get(expert)
        if ref is None or last or ref.shape != latents.shape:
            return None
        scale = float(ref.abs().mean())
        distance = float((latents - ref).abs().mean()) / max(scale, 1e-8)
        if distance >= self.threshold:
            return None
        self.reused += 1
        return self.outputs[expert]

    def store(self, expert: str, latents: torch.Tensor, prediction: torch.Tensor) -> None:
        self.inputs[expert] = latents
        self.outputs[expert] = prediction
        self.computed += 1


@dataclass
class SamplerState:
    """One request in flight: its latents and where it is in its schedule (backends subclass it)."""

    job: DenoiseJob
    latents: torch.Tensor
    total: int  # steps
    step: int = 0  # steps done
    experts_used: list[str] = field(default_factory=list)
    cache: StepCache | None = None  # when job.step_cache is set: created by the loop at the first step

    @property
    def done(self) -> bool:
        return self.step >= self.total


def check_guidance(value: float, name: str) -> None:
    if not math.isfinite(value) or not 0 <= value <= 30:
        raise InvalidArgument(f"{name} must be in 0..30 (0 = default); got {value}", field=name)


class ModelBackend(ABC):
    """A model behind the sampler loop. Methods that touch a request's state are not thread-safe
    per request; the executor runs one step of a request at a time."""

    name: str  # the model ("default", "wan2.2-t2v-a14b", ...)
    kind: str  # the backend ("default" | "wan2.2"), as ModelInfo.backend says it

    @abstractmethod
    def supports(self) -> ModelSupport:
        """The rules and facts GetModelInfo publishes."""

    @abstractmethod
    def check_request(self, job: DenoiseJob, encoder_model: str = "") -> None:
        """Raise InvalidArgument / FailedPrecondition for a request this model cannot run; change nothing."""

    @abstractmethod
    def start(self, job: DenoiseJob) -> SamplerState:
        """The request's initial noise (from its seed) and fresh per-request sampler state."""

    @abstractmethod
    def expert_for(self, state: SamplerState) -> str:
        """The expert that runs the request's next step."""

    @abstractmethod
    def batch_key(self, state: SamplerState) -> Hashable:
        """Requests with equal keys may share one forward (same expert, latent shape, ...)."""

    @abstractmethod
    def forward(self, expert: str, states: Sequence[SamplerState]) -> list[torch.Tensor]:
        """One batched forward of `expert` for requests of one batch_key at their next step: the
        conditional and unconditional branches of all of them in one batch; returns each request's
        guided prediction."""

    @abstractmethod
    def step(self, state: SamplerState, prediction: torch.Tensor) -> float:
        """Advance the request by one sampler step; return the step's time t in [0, 1] (1 = noise)."""

    @abstractmethod
    def decode(self, state: SamplerState) -> Iterator[np.ndarray]:
        """The finished request's frames as uint8 (n, H, W, 3) RGB chunks, in order, as they decode."""

    def decode_key(self, state: SamplerState) -> Hashable:
        """Finished requests with equal keys may decode together (decode_batch)."""
        return tuple(state.latents.shape)

    def decode_batch(self, states: Sequence[SamplerState]) -> Iterator[list[np.ndarray]]:
        """Several finished requests of one decode_key decoded together: per chunk, one uint8 array per
        state. This default decodes them one chunk of each in turn; a backend whose decoder batches
        (Wan's VAE) overrides it."""
        for chunks in zip(*(self.decode(s) for s in states), strict=True):
            yield list(chunks)

    def remote_state(self, state: SamplerState) -> SamplerState:
        """What `forward` needs of a request when it runs elsewhere (a Ray shard), sent there once per
        request: the state without its latents, which travel with every step (with `step`), and
        without anything that advances (a scheduler stays with the loop)."""
        return dataclasses.replace(state, latents=None, experts_used=[], cache=None)

    def parameters(self, expert: str) -> int:
        """Parameters of one expert (0 where this process did not load it)."""
        return 0
