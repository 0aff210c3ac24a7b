"""Wan through the mesh vs diffusers' WanPipeline called directly, with the tiny Wan model (one run).

    python scripts/bench_wan.py [--size 128x96] [--frames 17] [--steps 8] [--repeats 5] [--concurrent 8]

Prints the machine (CPU model, cores, amx_bf16 / avx512_bf16), then:
- latency of one request, warm: min and median of `repeats` sequential requests through the mesh
  (`videomesh up --model wan2.2`: encoder, denoiser, upscaler, QC, gateway as processes, a finished
  MP4 in storage) vs WanPipeline(...) in this process with the same prompt, size, frames, steps and
  guidance (bf16 DiT, fp32 VAE, as the mesh loads them);
- throughput: `concurrent` requests submitted at once to the mesh vs the same number of sequential
  WanPipeline calls (clips per minute).
The mesh runs as `up` runs it, with the result cache and the quality gate's regenerations off (each
request is new work, and a failed check on random frames would re-run it), `workers` raised to
`concurrent`, and an enterprise tenant (16 running at once). Nothing touches the network.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT, NEGATIVE = "a red ball moving left on a white background", "blurry, static"


def machine() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else model
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(f.group(1).split()) if f else set()
    except OSError:
        pass
    bf16 = (
        ", ".join(x for x in ("amx_bf16", "avx512_bf16") if x in flags) or "neither amx_bf16 nor avx512_bf16"
    )
    return f"{model}; {os.cpu_count()} logical CPUs; {bf16}"


def load_pipeline(wan_dir: Path):
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(wan_dir, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(wan_dir, vae=vae, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct(pipe, args, seeds: list[int]) -> list[float]:
    import torch

    w, h = args.width, args.height
    times = []
    for seed in seeds:
        t0 = time.perf_counter()
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=h, width=w, num_frames=args.frames,
             num_inference_steps=args.steps, guidance_scale=4.0, guidance_scale_2=3.0,
             generator=torch.Generator().manual_seed(seed), output_type="np")  # fmt: skip
        times.append(time.perf_counter() - t0)
    return times


def through_mesh(client, args, seed: int) -> float:
    from videomesh.v1 import common_pb2

    spec = common_pb2.VideoSpec(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.width, height=args.height,
                                num_frames=args.frames, num_steps=args.steps, guidance_scale=4.0,
                                guidance_scale_2=3.0, seed=seed)  # fmt: skip
    t0 = time.perf_counter()
    last = None
    for ev in client.generate(spec, timeout=1800):
        last = ev
    if last is None or last.WhichOneof("event") != "completed":
        raise RuntimeError(f"request failed: {last}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="128x96")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--work-dir", default=None, help="default: a temporary directory")
    args = p.parse_args(argv)
    args.width, args.height = (int(x) for x in args.size.lower().split("x"))

    from gateway.tenants import TenantDirectory
    from tests.wan_tiny import save_tiny_wan
    from videomesh.client import VideoClient
    from videomesh.mesh import LocalMesh

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-wan-"))
    wan_dir = work / "wan-a14b-tiny"
    if not (wan_dir / "model_index.json").exists():
        save_tiny_wan(wan_dir, "a14b")
    print(f"machine: {machine()}")
    print(f"settings: tiny Wan2.2 A14B layout, {args.width}x{args.height}, {args.frames} frames, {args.steps} steps, "
          f"guidance 4.0/3.0, bf16 DiT + fp32 VAE; torch threads {__import__('torch').get_num_threads()}")  # fmt: skip

    # --- WanPipeline directly: one warm-up, then the repeats, then `concurrent` sequential calls
    pipe = load_pipeline(wan_dir)
    d_lat = direct(pipe, args, [0, *range(1, args.repeats + 1)])[1:]
    seq_wall = sum(direct(pipe, args, list(range(200, 200 + args.concurrent))))
    del pipe

    # --- the mesh, as `videomesh up --model wan2.2` runs it
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    bench_key = TenantDirectory(data / "tenants.json").add("bench", "enterprise")
    env = {"VIDEOMESH_HOME": str(work / "home"), "VIDEOMESH_GATEWAY_CACHE": "0",
           "VIDEOMESH_GATEWAY_QC_POLICY": "off", "VIDEOMESH_GATEWAY_WORKERS": str(max(2, args.concurrent))}  # fmt: skip
    extra = ["--model", "wan2.2", "--model-dir", str(wan_dir)]
    mesh = LocalMesh(data, env=env, extra_args={"encoder": extra, "denoiser": extra})
    try:
        t0 = time.perf_counter()
        address = mesh.start(timeout=600)
        print(f"mesh up in {time.perf_counter() - t0:.1f} s at {address}")
        with VideoClient(address, bench_key) as c:
            through_mesh(c, args, 1000)  # warm-up
            m_lat = [through_mesh(c, args, 1001 + i) for i in range(args.repeats)]
            results: list[float] = []
            errors: list[BaseException] = []

            def one(seed):
                try:
                    results.append(through_mesh(c, args, seed))
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

            threads = [threading.Thread(target=one, args=(2000 + i,)) for i in range(args.concurrent)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            conc_wall = time.perf_counter() - t0
            if errors:
                raise errors[0]
    finally:
        mesh.stop()

    def fmt(xs):
        return f"min {min(xs):.2f} s, median {statistics.median(xs):.2f} s (n={len(xs)})"

    print(f"latency, one request (warm): mesh {fmt(m_lat)}; WanPipeline {fmt(d_lat)}; "
          f"mesh overhead at the median {statistics.median(m_lat) - statistics.median(d_lat):+.2f} s")  # fmt: skip
    n = args.concurrent
    print(f"throughput: {n} concurrent through the mesh in {conc_wall:.2f} s ({60 * n / conc_wall:.1f} clips/min); "
          f"{n} sequential WanPipeline calls in {seq_wall:.2f} s ({60 * n / seq_wall:.1f} clips/min); "
          f"ratio {seq_wall / conc_wall:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
