"""Step caching (base.StepCache through the one sampler loop): off by default, state per request and
per expert, an expert's first step and the last step always run, and it works for every backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from services.denoiser.backends.base import DenoiseJob, StepCache
from services.denoiser.backends.default import DefaultBackend
from services.denoiser.backends.loop import advance, sample
from services.denoiser.executors import LocalExecutor
from tests.helpers import random_tiny_engine, tiny_job


@pytest.fixture(scope="module")
def engine():
    return random_tiny_engine()


def _job(seed=0, **kw) -> DenoiseJob:
    return tiny_job(seed, **{"steps": 12, **kw})


class _Counting(DefaultBackend):
    def __init__(self, engine):
        super().__init__(engine)
        self.calls: list[tuple[str, int]] = []  # (expert, step) of every request in every forward

    def forward(self, expert, states):
        self.calls += [(expert, s.step) for s in states]
        return super().forward(expert, states)


def _steps(backend, job):
    state = backend.start(job)
    while not state.done:
        advance(backend, [state])
    return state, np.concatenate(list(backend.decode(state)))


def test_off_by_default_and_at_zero(engine):
    backend = _Counting(engine)
    state, frames = _steps(backend, _job(1))
    assert state.cache is None and len(backend.calls) == 12
    assert np.array_equal(frames, sample(DefaultBackend(engine), _job(1, step_cache=0.0)))


def test_reuse_skips_forwards_keeps_each_experts_first_step_and_the_last(engine):
    backend = _Counting(engine)
    state, frames = _steps(backend, _job(2, step_cache=0.5))
    computed = backend.calls
    assert state.cache.reused > 0 and len(computed) + state.cache.reused == 12
    assert state.cache.computed == len(computed)
    ran = {step for _, step in computed}
    first_low = state.experts_used.index("low_noise")
    assert {0, first_low, 11} <= ran  # each expert's first step and the last step ran the model
    # a reused step took the prediction of its own expert: every expert that stepped also computed
    assert {e for e, _ in computed} == set(state.experts_used)
    exact = sample(DefaultBackend(engine), _job(2))
    assert not np.array_equal(frames, exact)  # faster, slightly different frames
    assert np.abs(frames.astype(int) - exact.astype(int)).mean() < 40


def test_a_threshold_of_zero_point_zero_one_reuses_less_than_a_larger_one(engine):
    reused = []
    for threshold in (0.01, 0.2, 1.0):
        state, _ = _steps(DefaultBackend(engine), _job(3, step_cache=threshold))
        reused.append(state.cache.reused)
    assert reused == sorted(reused) and reused[-1] > reused[0]


def test_state_is_per_request(engine):
    """Two requests stepped together, one cached and one not: the uncached one runs every step, the
    cached one reuses exactly as it does alone; a second run of a request starts from an empty cache."""
    backend = _Counting(engine)
    alone_state, alone = _steps(DefaultBackend(engine), _job(4, step_cache=0.5))
    a, b = backend.start(_job(4, step_cache=0.5)), backend.start(_job(5))
    while not (a.done and b.done):
        advance(backend, [a, b])
    assert b.cache is None and sum(1 for _ in backend.calls) == 12 + a.cache.computed
    assert a.cache.reused == alone_state.cache.reused
    together = np.concatenate(list(backend.decode(a))).astype(int)
    assert np.abs(together - alone.astype(int)).max() <= 1  # batched rounding only
    again, frames = _steps(DefaultBackend(engine), _job(4, step_cache=0.5))
    assert again.cache.reused == alone_state.cache.reused and np.array_equal(frames, alone)


def test_the_cache_is_keyed_by_expert():
    cache = StepCache(threshold=10.0)
    x = torch.ones(1, 4)
    cache.store("high_noise", x, torch.full((1, 4), 7.0))
    assert cache.lookup("low_noise", x, last=False) is None  # never another expert's output
    assert torch.equal(cache.lookup("high_noise", x * 1.01, last=False), torch.full((1, 4), 7.0))
    assert cache.lookup("high_noise", x, last=True) is None  # the last step always runs
    assert cache.lookup("high_noise", x[:, :2], last=False) is None


def test_the_executor_reports_computed_and_reused_steps(engine):
    executor = LocalExecutor(DefaultBackend(engine))
    try:
        stats: dict = {}
        list(executor.stream(_job(6, step_cache=0.5), stats=stats))
        assert stats["reused"] > 0 and stats["computed"] + stats["reused"] == 12
        plain: dict = {}
        list(executor.stream(_job(6), stats=plain))
        assert plain == {"computed": 12, "reused": 0}
    finally:
        executor.close()


def test_a_remote_state_carries_no_cache(engine):
    backend = DefaultBackend(engine)
    state = backend.start(_job(7, step_cache=0.5))
    advance(backend, [state])
    assert state.cache is not None and backend.remote_state(state).cache is None


@pytest.mark.slow
def test_wan_backend_reuses_steps_too(tmp_path):
    pytest.importorskip("diffusers")
    from services.denoiser.backends.wan import WanBackend
    from services.encoder.umt5 import UMT5TextEncoder
    from tests.wan_tiny import save_tiny_wan

    d = save_tiny_wan(tmp_path / "wan", "a14b")
    backend = WanBackend.load(d, dtype=torch.float32)
    enc = UMT5TextEncoder.from_dir(d, dtype=torch.float32).encode(["a red ball", ""])
    job = DenoiseJob(text=enc.states[:1], text_mask=enc.mask[:1], negative=enc.states[1:],
                     negative_mask=enc.mask[1:], frames=5, width=32, height=16, seed=0, steps=10,
                     guidance=5.0)  # fmt: skip
    exact = sample(backend, job)
    state = backend.start(dataclasses.replace(job, step_cache=1.0))
    while not state.done:
        advance(backend, [state])
    frames = np.concatenate(list(backend.decode(state)))
    assert state.cache.reused > 0 and state.cache.computed >= len(set(state.experts_used)) + 1
    assert frames.shape == exact.shape and frames.dtype == np.uint8
