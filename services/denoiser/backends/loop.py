"""The one sampler loop: drives any ModelBackend, one request alone or many stepped together.

`advance(backend, states)` is one scheduler tick of a step-level batcher: every unfinished
request does its next step, requests that share a batch key (same expert, same latent shape)
in one forward. Where a forward runs is the caller's choice (`submit`): in this process by
default, on a Ray shard for the Ray executor; the grouping, the sampler step and the progress
callback are the same everywhere. `run(backend, job)` is one request alone, frames streamed as
they decode.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch

from services.denoiser.backends.base import DenoiseJob, ModelBackend, SamplerState
from services.denoiser.sampling import SamplingCancelled

# on_step(state, expert, t): after each step; t in [0, 1] is where the step started
StepCallback = Callable[[SamplerState, str, float], None]
# submit(place, expert, states) -> a function that waits for the forward and returns one prediction
# per state, or None when the forward could not run (the states keep their step; the next tick retries)
Submit = Callable[[Hashable, str, Sequence[SamplerState]], Callable[[], list[torch.Tensor] | None]]


def advance(
    backend: ModelBackend,
    states: Sequence[SamplerState],
    on_step: StepCallback | None = None,
    *,
    submit: Submit | None = None,
    place: Callable[[SamplerState], Hashable] | None = None,
    max_batch: int = 0,
) -> None:
    """Every unfinished request in `states` does one step; one forward per batch key (and place),
    at most `max_batch` requests each (0 = no limit). All forwards of the tick are submitted before
    the first is waited for, so forwards on different experts (shards) run at the same time."""
    groups: dict[tuple, list[SamplerState]] = defaultdict(list)
    for s in states:
        if not s.done:
            groups[(place(s) if place else None, backend.batch_key(s))].append(s)
    calls = []
    for (where, _), group in groups.items():
        expert = backend.expert_for(group[0])
        size = max_batch or len(group)
        for k in range(0, len(group), size):
            part = group[k : k + size]
            if submit is None:  # in process, one forward after the other
                calls.append((expert, part, lambda e=expert, p=part: backend.forward(e, p)))
            else:
                calls.append((expert, part, submit(where, expert, part)))
    for expert, part, result in calls:
        predictions = result()
        if predictions is None:
            continue
        for s, prediction in zip(part, predictions, strict=True):
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
