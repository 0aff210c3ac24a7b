"""The one sampler loop: drives any ModelBackend, one request alone or many stepped together.

`advance(backend, states)` is one scheduler tick of a step-level batcher: every unfinished
request does its next step, requests that share a batch key (same expert, same latent shape)
in one forward. `run(backend, job)` is one request alone, frames streamed as they decode.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from services.denoiser.backends.base import DenoiseJob, ModelBackend, SamplerState
from services.denoiser.sampling import SamplingCancelled

# on_step(state, expert, t): after each step; t in [0, 1] is where the step started
StepCallback = Callable[[SamplerState, str, float], None]


def advance(
    backend: ModelBackend, states: Sequence[SamplerState], on_step: StepCallback | None = None
) -> None:
    """Every unfinished request in `states` does one step; one forward per batch key."""
    groups: dict[object, list[SamplerState]] = defaultdict(list)
    for s in states:
        if not s.done:
            groups[backend.batch_key(s)].append(s)
    for group in groups.values():
        expert = backend.expert_for(group[0])
        for s, prediction in zip(group, backend.forward(expert, group), strict=True):
            t = backend.step(s, prediction)
            s.experts_used.append(expert)
            if on_step is not None:
                on_step(s, expert, t)


def run(
    backend: ModelBackend,
    job: DenoiseJob,
    *,
    on_step: Callable[[int, int, str, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[np.ndarray]:
    """Sample one request alone and yield its uint8 (n, H, W, 3) frame chunks as they decode.
    on_step(step, total, expert, t) after every step; should_stop() is asked before each step."""
    state = backend.start(job)

    def report(s: SamplerState, expert: str, t: float) -> None:
        if on_step is not None:
            on_step(s.step, s.total, expert, t)

    while not state.done:
        if should_stop is not None and should_stop():
            raise SamplingCancelled(f"stopped before step {state.step + 1} of {state.total}")
        advance(backend, [state], report)
    yield from backend.decode(state)


def sample(backend: ModelBackend, job: DenoiseJob, **kw) -> np.ndarray:
    """`run` collected: (T, H, W, 3) uint8."""
    return np.concatenate(list(run(backend, job, **kw)))
