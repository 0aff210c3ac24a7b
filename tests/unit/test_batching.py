"""The in-process executor: one long-lived torch thread, concurrent requests batched at step
boundaries, and the capacity the gateway sizes its slots from."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from services.denoiser.backends.base import DenoiseJob
from services.denoiser.backends.default import DefaultBackend
from services.denoiser.backends.loop import sample
from services.denoiser.engine import DenoiserEngine, DenoiserSettings, load_backend
from services.denoiser.executors import LocalExecutor, default_batch, make_executor
from tests.helpers import random_tiny_engine, run_concurrently, tiny_job
from videomesh.inference import InferenceThread, available_cores, set_torch_threads


@pytest.fixture(scope="module")
def engine():
    return random_tiny_engine()


def _job(seed=0, length=5, **kw) -> DenoiseJob:
    return tiny_job(seed, length, **{"steps": 6, **kw})


class _Spy(DefaultBackend):
    """The default backend, recording which thread did what and the size of every forward."""

    def __init__(self, engine):
        super().__init__(engine)
        self.threads: dict[str, set[int]] = {"start": set(), "forward": set(), "decode": set()}
        self.batches: list[int] = []

    def start(self, job):
        self.threads["start"].add(threading.get_ident())
        return super().start(job)

    def forward(self, expert, states):
        self.threads["forward"].add(threading.get_ident())
        self.batches.append(len(states))
        return super().forward(expert, states)

    def decode(self, state):
        for chunk in super().decode(state):
            self.threads["decode"].add(threading.get_ident())
            yield chunk


def test_concurrent_requests_share_forwards_and_keep_their_frames(engine):
    backend = _Spy(engine)
    alone = [sample(DefaultBackend(engine), _job(i, length=3 + i)) for i in range(4)]
    executor = LocalExecutor(backend, max_batch=4, batch_wait=0.5)
    try:
        together = run_concurrently(executor, [_job(i, length=3 + i) for i in range(4)])
    finally:
        executor.close()
    assert max(backend.batches) > 1  # requests shared forwards (texts of different lengths too)
    assert sum(backend.batches) == 4 * 6  # every request did each of its steps once
    for a, b in zip(alone, together, strict=True):
        diff = np.abs(a.astype(int) - b.astype(int))
        # batched GEMMs round a few values differently from a request alone: one level at most
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_all_torch_work_runs_on_the_thread_the_model_loaded_on(engine):
    worker = InferenceThread("test-denoiser")
    loaded_on = worker.call(threading.get_ident)
    backend = _Spy(engine)
    executor = LocalExecutor(backend, max_batch=2, worker=worker)
    try:
        run_concurrently(executor, [_job(1), _job(2), _job(3)])
        # a call from another thread runs there too, between ticks
        assert executor.call(threading.get_ident) == loaded_on
    finally:
        executor.close()
        worker.close()
    for what, idents in backend.threads.items():
        assert idents == {loaded_on}, what


def test_max_batch_bounds_a_forward_and_is_the_capacity(engine):
    backend = _Spy(engine)
    executor = LocalExecutor(backend, max_batch=2, batch_wait=0.5)
    try:
        assert executor.capacity == 2
        run_concurrently(executor, [_job(i) for i in range(5)])
    finally:
        executor.close()
    assert max(backend.batches) == 2


def test_a_new_batch_waits_for_requests_that_arrive_together(engine):
    backend = _Spy(engine)
    executor = LocalExecutor(backend, max_batch=3, batch_wait=2.0)
    try:
        run_concurrently(executor, [_job(i) for i in range(3)])
    finally:
        executor.close()
    assert backend.batches[0] == 3  # all three started at the first step


def test_defaults_and_settings():
    tiny = DenoiserEngine(DenoiserSettings(model="tiny"))
    assert default_batch(DefaultBackend(tiny)) == 8
    with pytest.raises(ValueError, match="batch_wait"):
        DenoiserSettings(batch_wait=-1).validate()
    settings = DenoiserSettings(model="tiny", max_batch=3, batch_wait=0.01)
    executor = make_executor(load_backend(settings), settings)
    assert executor.capacity == 3 and executor.batch_wait == 0.01
    executor.close()


def test_close_fails_queued_calls_instead_of_hanging(engine):
    executor = LocalExecutor(DefaultBackend(engine))
    executor.start()
    executor.close()
    from services.denoiser.sampling import SamplingCancelled

    with pytest.raises(SamplingCancelled):
        executor.call(time.time)


def test_torch_threads_come_from_the_machine(tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    assert available_cores(quota) == min(2, available_cores(tmp_path / "none"))
    quota.write_text("max 100000\n")
    assert available_cores(quota) == available_cores(tmp_path / "none") >= 1
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_torch_threads(0) == available_cores()
    finally:
        torch.set_num_threads(before)


def test_a_request_starting_while_the_executor_closes_is_refused_not_left_waiting(engine):
    from services.denoiser.sampling import SamplingCancelled

    release = threading.Event()

    class SlowStart(DefaultBackend):
        def start(self, job):
            release.wait(10)  # close() begins while this request's start runs
            return super().start(job)

    executor = LocalExecutor(SlowStart(engine))
    outcome: list = []

    def request():
        try:
            executor.run(_job(1))
            outcome.append("ran")
        except SamplingCancelled as err:
            outcome.append(err)

    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.3)
    closing = threading.Thread(target=executor.close)
    closing.start()
    time.sleep(0.2)
    release.set()
    t.join(15)
    closing.join(15)
    assert not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], SamplingCancelled)


def test_a_scheduler_that_dies_fails_its_waiters_instead_of_hanging_them(engine):
    from videomesh.errors import Unavailable

    class Fatal(BaseException):
        pass

    class Dying(DefaultBackend):
        def forward(self, expert, states):
            raise Fatal("boom")

    worker = InferenceThread("test-dying")
    executor = LocalExecutor(Dying(engine), worker=worker)
    try:
        with pytest.raises(Unavailable, match="scheduler stopped"):
            executor.run(_job(2))
    finally:
        executor.close()
        worker.close()
