"""Wan requests that finish sampling together decode as one VAE batch, each getting its own frames."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from services.denoiser.backends.base import DenoiseJob  # noqa: E402
from services.denoiser.backends.loop import sample  # noqa: E402
from services.denoiser.backends.wan import WanBackend  # noqa: E402
from services.denoiser.executors import LocalExecutor  # noqa: E402
from services.encoder.umt5 import UMT5TextEncoder  # noqa: E402
from tests.helpers import run_concurrently  # noqa: E402
from tests.wan_tiny import save_tiny_wan  # noqa: E402


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    d = save_tiny_wan(tmp_path_factory.mktemp("wan") / "a14b", "a14b")
    backend = WanBackend.load(d, dtype=torch.float32)
    enc = UMT5TextEncoder.from_dir(d, dtype=torch.float32).encode(["a red ball moving left", "blurry"])
    return backend, enc


def _job(enc, seed: int) -> DenoiseJob:
    return DenoiseJob(text=enc.states[:1], text_mask=enc.mask[:1], negative=enc.states[1:], negative_mask=enc.mask[1:],
                      frames=9, width=32, height=16, seed=seed, steps=3, guidance=4.0)  # fmt: skip


def test_a_decode_batch_of_one_is_the_decode(wan):
    backend, enc = wan
    state = backend.start(_job(enc, 1))
    while not state.done:
        from services.denoiser.backends.loop import advance

        advance(backend, [state])
    alone = list(backend.decode(state))
    batched = [chunks[0] for chunks in backend.decode_batch([state])]
    assert len(alone) == len(batched) and all(
        np.array_equal(a, b) for a, b in zip(alone, batched, strict=True)
    )


def test_requests_finishing_together_decode_together_with_their_own_frames(wan):
    backend, enc = wan
    jobs = [_job(enc, s) for s in (1, 2, 3)]
    alone = [sample(backend, j) for j in jobs]
    executor = LocalExecutor(backend, max_batch=4, batch_wait=1.0, decode_batch=4)
    try:
        out = run_concurrently(executor, jobs)
        assert executor.stats()["decode_batches"] == [3]
    finally:
        executor.close()
    for i in range(3):
        assert out[i].shape == alone[i].shape
        # batched fp32 convolutions may round a value differently from a batch of one
        assert np.abs(out[i].astype(int) - alone[i].astype(int)).max() <= 1, i
    assert not np.array_equal(out[0], out[1])  # each got its own frames


def test_decoding_alone_is_the_default_and_keeps_frames_bit_for_bit(wan):
    backend, enc = wan
    jobs = [_job(enc, s) for s in (6, 7)]
    alone = [sample(backend, j) for j in jobs]
    executor = LocalExecutor(backend, max_batch=4, batch_wait=1.0)
    try:
        out = run_concurrently(executor, jobs)
        assert not executor.stats()["decode_batches"]
    finally:
        executor.close()
    assert all(np.array_equal(out[i], alone[i]) for i in range(2))


def test_a_reader_that_stops_does_not_stop_the_others(wan):
    backend, enc = wan
    executor = LocalExecutor(backend, max_batch=4, batch_wait=1.0, decode_batch=4)
    jobs = [_job(enc, s) for s in (4, 5)]
    want = sample(backend, jobs[1])
    got: dict[int, object] = {}

    def first():  # reads one chunk, then stops reading
        stream = executor.stream(jobs[0])
        got[0] = next(stream)
        stream.close()

    def second():
        got[1] = executor.run(jobs[1])

    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        executor.close()
    assert got[1].shape == want.shape and np.abs(got[1].astype(int) - want.astype(int)).max() <= 1
