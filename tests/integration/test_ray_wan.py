"""Wan on the Ray executor: each ExpertShard holds one WanTransformer3DModel (no VAE), the driver
holds no expert (it starts requests, steps their schedulers and decodes); on a simulated
multi-node cluster, three requests arriving at different times give the frames each gives alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("diffusers")
pytest.importorskip("ftfy")
from ray.cluster_utils import Cluster  # noqa: E402

from services.denoiser.backends.base import DenoiseJob  # noqa: E402
from services.denoiser.backends.loop import sample  # noqa: E402
from services.denoiser.backends.wan import WanBackend  # noqa: E402
from services.denoiser.engine import DenoiserSettings, load_backend  # noqa: E402
from services.denoiser.executors import RayExecutor, RaySettings  # noqa: E402
from services.encoder.umt5 import UMT5TextEncoder  # noqa: E402
from tests.wan_tiny import save_tiny_wan  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "a14b", "a14b")


def _job(encoder, prompt, negative="", **kw) -> DenoiseJob:
    enc = encoder.encode([prompt, negative])
    fields = dict(frames=9, width=32, height=16, seed=0, steps=4, guidance=5.0)
    fields.update(kw)
    return DenoiseJob(enc.states[:1], enc.mask[:1], enc.states[1:], enc.mask[1:], **fields)


def test_concurrent_requests_on_expert_shards_give_the_frames_each_gives_alone(cluster, wan_dir):
    encoder = UMT5TextEncoder.from_dir(wan_dir, dtype=torch.bfloat16)
    jobs = [
        _job(encoder, "a blue box moving right", seed=1, steps=8, guidance=4.0, guidance_2=3.0),
        _job(encoder, "一个红色的球向左移动", "blurry", seed=2, steps=6, guidance=6.0),
        _job(encoder, "白い背景の上を跳ねる猫", seed=3, steps=5, guidance=3.5, width=16, height=32),
    ]
    full = WanBackend.load(wan_dir)
    alone = [sample(full, j) for j in jobs]

    settings = DenoiserSettings(model="wan2.2", model_dir=wan_dir, executor="ray")
    driver = load_backend(settings, experts=())
    assert driver.experts == {} and driver.vae is not None
    ex = RayExecutor(driver, RaySettings(strategy="SPREAD"), settings)
    ex.start()
    try:
        info = {i["expert"]: i for i in ex.placement()}
        assert {e: (i["loaded"], i["decoder"]) for e, i in info.items()} == {
            "high_noise": (["high_noise"], False),
            "low_noise": (["low_noise"], False),
        }
        assert info["high_noise"]["node_id"] != info["low_noise"]["node_id"]  # SPREAD over the nodes
        out, events = {}, {i: [] for i in range(3)}
        started = [threading.Event() for _ in jobs]

        def call(i):
            def on_step(*a):
                events[i].append(a)
                started[i].set()

            out[i] = ex.run(jobs[i], on_step=on_step)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for i, t in enumerate(threads):
            t.start()
            assert started[i].wait(120)  # the next request arrives while this one is stepping
        for t in threads:
            t.join(300)
        st = ex.stats()
    finally:
        ex.close()
    for i, job in enumerate(jobs):
        assert np.array_equal(out[i], alone[i]), i
        assert [e[0] for e in events[i]] == list(range(1, job.steps + 1))
    # the texts reached each shard once per request (3 requests, 19 steps), through the object store
    assert all(n <= 3 for n in st["state_fetches"].values()) and sum(st["state_fetches"].values()) >= 3, st
    assert max(max(v) for v in st["batch_sizes"].values()) > 1, st  # requests shared forwards
    assert st["pipelined_ticks"] > 0, st  # both shards busy at once on different requests


def test_a_killed_wan_shard_restarts_and_the_request_continues(cluster, wan_dir):
    encoder = UMT5TextEncoder.from_dir(wan_dir, dtype=torch.bfloat16)
    job = _job(encoder, "a dog on the street at night", seed=5, steps=10, guidance=4.0)
    expected = sample(WanBackend.load(wan_dir), job)
    settings = DenoiserSettings(model="wan2.2", model_dir=wan_dir, executor="ray")
    ex = RayExecutor(load_backend(settings, experts=()), RaySettings(), settings)
    ex.start()
    try:
        steps, res = [], {}
        t = threading.Thread(
            target=lambda: res.setdefault("frames", ex.run(job, on_step=lambda *a: steps.append(a)))
        )
        t.start()
        while len(steps) < 2:
            time.sleep(0.01)
        ray.kill(ex.shards[0]["low_noise"], no_restart=True)
        t.join(240)
        assert "frames" in res and ex.restarts >= 1
        assert [s[0] for s in steps] == list(range(1, 11))  # every step once, in order
        # the restarted shard got the request's texts again and the frames are the same bits
        assert np.array_equal(res["frames"], expected)
    finally:
        ex.close()
