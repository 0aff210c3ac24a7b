"""The backend interface and the embedded default model behind it (no diffusers needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from services.denoiser.backends.base import DenoiseJob, FrameRule, SizeRule
from services.denoiser.backends.default import DefaultBackend
from services.denoiser.backends.loop import advance, run, sample
from services.denoiser.sampling import SamplingCancelled
from tests.helpers import random_tiny_engine, tiny_job
from videomesh.errors import InvalidArgument


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tests.helpers import random_adapter

    adapters = tmp_path_factory.mktemp("adapters")
    random_adapter("look", 1).save(adapters / "look.safetensors")
    return random_tiny_engine(adapters)


def _job(seed=0, **kw) -> DenoiseJob:
    return tiny_job(seed, **kw)


@pytest.mark.parametrize(
    "change",
    [{}, {"guidance": 1.0}, {"guidance": 7.5, "steps": 6}, {"adapter": "look", "adapter_strength": 0.5}],
    ids=["default-guidance", "no-cfg", "guided", "adapter"],
)
def test_default_backend_gives_the_engines_frames_bit_for_bit(engine, change):
    job = _job(3, **change)
    backend = DefaultBackend(engine)
    backend.check_request(job)
    seen_engine, seen_backend = [], []
    want = engine.generate(job, on_step=lambda *a: seen_engine.append(a))
    got = sample(backend, job, on_step=lambda *a: seen_backend.append(a))
    assert got.dtype == np.uint8 and np.array_equal(got, want) and want.std() > 0
    assert seen_backend == seen_engine  # (step, total, expert, t): the same progress events
    assert {e for _, _, e, _ in seen_backend} == {"high_noise", "low_noise"} or job.steps < 4


def test_guidance_2_sets_the_low_noise_scale(engine):
    backend = DefaultBackend(engine)
    same = sample(backend, _job(1, guidance=3.0))
    assert np.array_equal(sample(backend, _job(1, guidance=3.0, guidance_2=3.0)), same)
    assert not np.array_equal(sample(backend, _job(1, guidance=3.0, guidance_2=1.5)), same)


def test_requests_stepped_together_stay_close_to_alone(engine):
    # the default model pads texts of a batch to the longest (masked), so batching is close, not bit-exact
    backend = DefaultBackend(engine)
    jobs = [_job(1), _job(2, guidance=6.0), _job(3, guidance=1.0)]
    states = [backend.start(j) for j in jobs]
    while not all(s.done for s in states):
        advance(backend, states)
    for job, s in zip(jobs, states, strict=True):
        together = np.concatenate(list(backend.decode(s))).astype(int)
        assert np.abs(together - sample(backend, job).astype(int)).max() <= 1


def test_loop_stops_between_steps(engine):
    calls = []
    with pytest.raises(SamplingCancelled, match="before step 3 of 4"):
        list(
            run(
                DefaultBackend(engine),
                _job(),
                on_step=lambda *a: calls.append(a),
                should_stop=lambda: len(calls) == 2,
            )
        )


def test_default_support_and_checks(engine):
    backend = DefaultBackend(engine)
    s = backend.supports()
    assert (s.default_size, s.default_frames, s.text_length, s.encoder) == (
        (16, 16),
        4,
        0,
        engine.encoder_model,
    )
    assert [(e.name, e.default_guidance) for e in s.experts] == [("high_noise", 5.0), ("low_noise", 2.0)]
    with pytest.raises(InvalidArgument, match="this model generates 16x16; got 32x16"):
        backend.check_request(_job(width=32))
    with pytest.raises(InvalidArgument, match="guidance_scale_2 must be in 0..30"):
        backend.check_request(_job(guidance_2=-1.0))
    with pytest.raises(InvalidArgument, match="text only"):
        backend.check_request(dataclasses.replace(_job(), image=torch.zeros(3, 16, 16, dtype=torch.uint8)))


def test_rules_say_the_fix():
    frames = FrameRule(counts=(81,), step=4, max_frames=201, why="VAE")
    frames.check(81)
    for n, msg in [(80, "got 80 — use 81"), (79, "use 77 or 81"), (0, "use 1"), (205, "in 1..201")]:
        with pytest.raises(InvalidArgument, match=msg):
            frames.check(n)
    sizes = SizeRule(official=((1280, 720),), multiple=16, min_side=16, max_side=2048)
    sizes.check(1280, 720)
    sizes.check(848, 480)  # not an official size, but any multiple of 16 is accepted
    with pytest.raises(
        InvalidArgument, match="height must be a multiple of 16 for this model; got 500 — use 496"
    ):
        sizes.check(1280, 500)
    with pytest.raises(InvalidArgument, match="width must be in 16..2048"):
        sizes.check(4096, 720)
