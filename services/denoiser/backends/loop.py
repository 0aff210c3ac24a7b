"""The one sampler loop: drives any ModelBackend, one request alone or many stepped together.

`advance(backend, states)` is one scheduler tick of a step-level batcher: every unfinished
request does its next step, requests that share a batch key (same expert, same latent shape)
in one forward; a request with step caching on (DenoiseJob.step_cache, base.StepCache) whose
input has hardly moved reuses its expert's last prediction instead of joining a forward. Where a forward runs is the caller's choice (`submit`): in this process by
default, on a Ray shard for the Ray executor; the grouping, the sampler step and the progress
callback are the same everywhere. `run(backend, job)` is one request alone, frames streamed as
they decode.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch

from services.denoiser.backends.base import DenoiseJob, ModelBackend, SamplerState, StepCache
from services.denoiser.sampling import SamplingCancelled
from videomesh.metrics import DENOISER_BATCH

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
    reused: list[tuple[SamplerState, str, torch.Tensor]] = []
    for s in states:
        if s.done:
            continue
        if s.job.step_cache > 0:
            if s.cache is None:
                s.cache = StepCache(s.job.step_cache)
            expert = backend.expert_for(s)
            cached = s.cache.lookup(expert, s.latents, last=s.step == s.total - 1)
            if cached is not None:
                reused.append((s, expert, cached))
                continue
        groups[(place(s) if place else None, backend.batch_key(s))].append(s)
    calls = []
    for (where, _), group in groups.items():
        expert = backend.expert_for(group[0])
        size = max_batch or len(group)
        for k in range(0, len(group), size):
            part = group[k : k + size]
            DENOISER_BATCH.observe(len(part))
            if submit is None:  # in process, one forward after the other
                calls.append((expert, part, lambda e=expert, p=part: backend.forward(e, p)))
            else:
                calls.append((expert, part, submit(where, expert, part)))
    done: list[tuple[SamplerState, str, torch.Tensor]] = list(reused)
    for expert, part, result in calls:
        predictions = result()
        if predictions is None:
            continue
        for s, prediction in zip(part, predictions, strict=True):
            if s.cache is not None:
                s.cache.store(expert, s.latents, prediction)
            done.append((s, expert, prediction))
    for s, expert, prediction in done:
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
