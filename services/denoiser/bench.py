"""`make bench`: denoiser throughput, measured side by side in one run.

1. Ray executor, two expert shards, 4 concurrent requests (step-level batching + expert
   pipelining) vs the same shards serving the 4 requests one at a time.
2. In-process engine: bf16 autocast vs fp32 for one clip (AMX on this CPU).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from services.denoiser.engine import DenoiseJob, DenoiserEngine, DenoiserSettings


def _job(cfg, seed: int, steps: int) -> DenoiseJob:
    g = torch.Generator().manual_seed(seed)
    td = cfg.unet.text_dim
    return DenoiseJob(torch.randn(1, 12, td, generator=g), torch.ones(1, 12, dtype=torch.bool), torch.zeros(1, 1, td),
                      torch.ones(1, 1, dtype=torch.bool), cfg.frames, cfg.height, cfg.width, seed, steps, 0.0)  # fmt: skip


def bench_ray(model: str, steps: int, n: int = 4) -> None:
    import ray

    from services.denoiser.executors import RayExecutor, RaySettings

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    eng = DenoiserEngine(DenoiserSettings(model=model))
    eng.load()
    ex = RayExecutor(eng, RaySettings())
    ex.start()
    try:
        jobs = [_job(eng.cfg, i, steps) for i in range(n)]
        ex.run(_job(eng.cfg, 99, 2))  # warm-up
        t0 = time.perf_counter()
        for j in jobs:
            ex.run(j)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        threads = [threading.Thread(target=ex.run, args=(j,)) for j in jobs]
        for i, t in enumerate(threads):
            t.start()
            time.sleep(0.2 * i / n)  # staggered arrivals, as real traffic
        for t in threads:
            t.join()
        concurrent = time.perf_counter() - t0
        st = ex.stats()
    finally:
        ex.close()
        ray.shutdown()
    print(f"ray, model {model}, {n} requests x {steps} steps on 2 expert shards:")
    print(f"  one at a time: {serial:.2f} s ({n / serial:.2f} clips/s)")
    print(
        f"  batched + pipelined: {concurrent:.2f} s ({n / concurrent:.2f} clips/s) -> x{serial / concurrent:.2f}"
    )
    print(f"  max batch per shard {max(max(v) for v in st['batch_sizes'].values())}, ticks with both experts busy "
          f"{st['pipelined_ticks']} of {st['ticks']}")  # fmt: skip


def bench_precision(model: str, steps: int) -> None:
    times = {}
    for prec in ("fp32", "bf16"):
        eng = DenoiserEngine(DenoiserSettings(model=model, precision=prec))
        eng.load()
        eng.generate(_job(eng.cfg, 0, 2))
        t0 = time.perf_counter()
        eng.generate(_job(eng.cfg, 0, steps))
        times[prec] = time.perf_counter() - t0
    print(f"in-process {model}, {steps} steps with CFG: fp32 {times['fp32']:.2f} s, bf16 {times['bf16']:.2f} s "
          f"-> bf16 x{times['fp32'] / times['bf16']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench")
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-ray", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    bench_precision(a.model, a.steps)
    if not a.skip_ray:
        bench_ray(a.model, a.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
