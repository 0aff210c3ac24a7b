"""`videomesh bench` (`make bench`): the performance figures of issue #20, as ratios, in one run.

Prints a table and, with `--json PATH`, writes the figures: the top-level keys below (medians, so
other tools can read them), a `machine` object (CPU, cores, AMX/AVX512-BF16, GPU, torch, the
precision chosen) and a `details` object with every raw figure (min, median, n, the samples).
Every comparison is measured interleaved (A, B, A, B, ...) in one run; a ratio is the median (and
min) of the per-pair ratios.

Sections (each one's docstring says exactly what it measures):
1. mesh vs in-process: one job through the real mesh (a process per service) against the same
   work in this process, same precision and threads (`mesh_over_inprocess`);
2. 8 concurrent vs 8 sequential jobs through the mesh: throughput both ways, CPU-seconds per job
   from the services' own CPU times, and concurrent throughput as a share of what the cores allow
   (`concurrent_share_of_cpu_limit`);
3. per-stage seconds and time to the first event / the first progress event (section 1's mesh jobs);
4. the denoiser's FLOP/s as a share of the device's best GEMM (`denoiser_share_of_gemm`);
5. step caching: speed-up, PSNR against uncached frames, the adherence eval with and without
   (`step_cache_speedup`, `step_cache_adherence_delta_points`);
6. peak memory (VmHWM) of every service process after the runs;
7. the tiny random Wan model: mesh vs `WanPipeline` latency (`wan_mesh_over_pipeline`), and the mesh
   with 8 concurrent jobs vs 8 sequential WanPipeline calls (`wan_concurrent_over_sequential`).

Defaults: 5 interleaved pairs per latency comparison (`--repeats`), 5 rounds of the throughput ones.
`--quick`: 2 pairs, 1 throughput round, 2 GEMM sizes, 3 step-cache prompts and the adherence eval at 8
prompts per language (the fewest that cover every colour, shape and motion). `--sections` runs a
subset (mesh, gemm, step_cache, wan); `--concurrent` and `--steps` shrink the work for a trial run.

A section that cannot run here (no step caching in this tree, no diffusers, tests/ not importable)
leaves its keys null and says why under `unavailable`; nothing is estimated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# the figures other tools read, each with its goal from issue #20 (op, bound)
TOP_KEYS = (
    "mesh_over_inprocess",
    "concurrent_share_of_cpu_limit",
    "denoiser_share_of_gemm",
    "step_cache_speedup",
    "step_cache_adherence_delta_points",
    "wan_mesh_over_pipeline",
    "wan_concurrent_over_sequential",
)
GOALS: dict[str, tuple[str, float]] = {
    "mesh_over_inprocess": ("<=", 1.05),
    "concurrent_share_of_cpu_limit": (">=", 0.90),
    "denoiser_share_of_gemm": (">=", 0.50),
    "step_cache_speedup": (">=", 1.5),
    "step_cache_adherence_delta_points": ("abs<=", 2.0),
    "wan_mesh_over_pipeline": ("<=", 1.05),
    "wan_concurrent_over_sequential": (">=", 2.0),
}
LABELS = {
    "mesh_over_inprocess": "mesh / in-process latency",
    "concurrent_share_of_cpu_limit": "8 concurrent, share of the CPU limit",
    "denoiser_share_of_gemm": "denoiser FLOP/s / best GEMM",
    "step_cache_speedup": "step caching speed-up",
    "step_cache_adherence_delta_points": "step caching adherence delta (points)",
    "wan_mesh_over_pipeline": "tiny Wan: mesh / WanPipeline latency",
    "wan_concurrent_over_sequential": "tiny Wan: mesh 8 concurrent / 8 WanPipeline",
}
SECTIONS = ("mesh", "gemm", "step_cache", "wan")
CONCURRENT = 8  # jobs at once in the throughput comparisons
# the step-cache threshold (DenoiseJob.step_cache: relative L1 change of the latents) the speed-up and
# adherence figures are taken at. Default model, 20 steps, one prompt (2-core EPYC, noisy): 0.05 reused
# 3 of 20 steps (PSNR 31.6 dB vs uncached), 0.1 reused 8 (20.6 dB), 0.2 reused 12 (17.0 dB).
STEP_CACHE_THRESHOLD = 0.1
PROMPT = "a red circle moving to the right on a white background"
NEGATIVE = ""
# Large enough that the model's work outweighs the fixed per-clip work only the mesh does (MP4 encoding,
# watermarks, QC, storage: about 35 ms here); at 64x48, 9 frames, 4 steps WanPipeline takes 0.15 s and
# that fixed work alone is a quarter of it.
WAN_JOB = {"prompt": "a red ball moving left", "negative": "blurry", "steps": 8, "size": (128, 96),
           "frames": 17, "fps": 16.0, "guidance": 4.0, "guidance_2": 3.0}  # fmt: skip


@dataclass(frozen=True)
class Options:
    repeats: int = 5  # interleaved pairs per latency comparison
    quick: bool = False
    concurrent: int = CONCURRENT  # jobs at once (and one after the other) in the throughput comparisons
    steps: int = 0  # default-model jobs: 0 = the model's default steps (fewer only to try the bench out)
    step_cache: float = STEP_CACHE_THRESHOLD

    @property
    def rounds(self) -> int:
        """Rounds of the throughput comparisons (`concurrent` jobs each way): 1 in --quick."""
        return 1 if self.quick else self.repeats


# --- figures ------------------------------------------------------------------------------------------


def summary(samples: Iterable[float], unit: str = "") -> dict:
    """min, median and n of a list of samples (and the samples themselves)."""
    xs = [float(x) for x in samples]
    out = {"min": min(xs) if xs else None, "median": statistics.median(xs) if xs else None, "n": len(xs),
           "samples": [round(x, 6) for x in xs]}  # fmt: skip
    if unit:
        out["unit"] = unit
    return out


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-pair ratios a[i] / b[i] of two interleaved series."""
    return [x / y for x, y in zip(a, b, strict=True) if y]


@dataclass
class Figures:
    """What the sections measured: headline values (medians), raw figures, and why a figure is missing."""

    top: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each section

    def add(self, name: str, samples: Iterable[float], unit: str = "") -> dict:
        self.details[name] = summary(samples, unit)
        return self.details[name]

    def ratio(self, key: str, a: list[float], b: list[float], detail: str | None = None) -> None:
        """A headline ratio: the median of the per-pair ratios (details keep min and median)."""
        r = self.add(detail or key, ratios(a, b), "ratio")
        self.top[key] = r["median"]

    def missing(self, keys: Iterable[str], why: str) -> None:
        for k in keys:
            self.top[k] = None
            self.unavailable[k] = why


def goal_met(key: str, value: float | None) -> bool | None:
    if value is None or key not in GOALS:
        return None
    op, bound = GOALS[key]
    if op == "<=":
        return value <= bound
    if op == ">=":
        return value >= bound
    return abs(value) <= bound


def to_json(machine: dict, figures: Figures, opts: Options | None = None) -> dict:
    """The JSON document: every TOP_KEYS key (null when not measured), `machine`, `details`,
    `unavailable` (key -> why), `goals` and the run's settings."""
    doc: dict = {k: figures.top.get(k) for k in TOP_KEYS}
    doc["machine"] = dict(machine)
    doc["details"] = dict(figures.details)
    doc["unavailable"] = {k: v for k, v in figures.unavailable.items() if doc.get(k) is None}
    for k in TOP_KEYS:
        if doc[k] is None and k not in doc["unavailable"]:
            doc["unavailable"][k] = "not measured in this run (section skipped)"
    doc["goals"] = {
        k: {"goal": f"{op} {bound:g}", "met": goal_met(k, doc[k])} for k, (op, bound) in GOALS.items()
    }
    run_opts = dataclasses.asdict(opts) if opts is not None else {}
    doc["run"] = {**run_opts, "section_seconds": dict(figures.seconds)}
    return doc


def write_json(path: Path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n")


def render(doc: dict, console=None) -> None:
    """Print the machine, the headline ratios against their goals, then every raw figure."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = doc["machine"]
    flags = ", ".join(f for f in ("amx_bf16", "avx512_bf16") if m.get(f)) or "no AMX-BF16 / AVX512-BF16"
    console.print(f"[bold]machine[/]: {m.get('cpu_model')} ({flags}), {m.get('cores')} cores, "
                  f"GPU {m.get('gpu') or 'none'}, torch {m.get('torch')}, precision {m.get('precision')} "
                  f"({m.get('precision_reason', '')}), {m.get('torch_threads')} torch threads")  # fmt: skip
    t = Table(title="videomesh bench: ratios (median of interleaved pairs)")
    for c in ("figure", "median", "min", "n", "goal", "met"):
        t.add_column(c, justify="left" if c == "figure" else "right")
    details = doc.get("details", {})
    for k in TOP_KEYS:
        v = doc.get(k)
        d = details.get(k, {})
        met = doc.get("goals", {}).get(k, {}).get("met")
        t.add_row(
            LABELS.get(k, k),
            "—" if v is None else f"{v:.3f}",
            "—" if d.get("min") is None else f"{d['min']:.3f}",
            str(d.get("n", "")),
            doc.get("goals", {}).get(k, {}).get("goal", ""),
            {True: "[green]yes[/]", False: "[red]no[/]", None: "—"}[met],
        )
    console.print(t)
    raw = Table(title="raw figures")
    for c in ("figure", "median", "min", "n", "unit"):
        raw.add_column(c, justify="left" if c in ("figure", "unit") else "right")
    for name, d in details.items():
        if name in TOP_KEYS or not isinstance(d, dict) or "median" not in d:
            continue
        med, lo = d.get("median"), d.get("min")
        raw.add_row(name, "—" if med is None else f"{med:.4g}", "—" if lo is None else f"{lo:.4g}",
                    str(d.get("n", "")), d.get("unit", ""))  # fmt: skip
    console.print(raw)
    for k, why in doc.get("unavailable", {}).items():
        console.print(f"[yellow]{k}[/]: not available — {why}")


# --- the machine ----------------------------------------------------------------------------------------


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_machine() -> dict:
    import torch

    from services.denoiser.engine import pick_device, pick_dtype, precision_reason
    from videomesh.hardware import cpu_flags, describe_cpu
    from videomesh.launch import load_settings

    settings = load_settings("denoiser")
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.precision, device)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": describe_cpu().rsplit(" (", 1)[0],
        "cpu": describe_cpu(),
        "cores": cores(),
        "amx_bf16": "amx_bf16" in cpu_flags(),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
        "gpu": gpu,
        "torch": torch.__version__,
        "device": str(device),
        "precision": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
        "precision_reason": precision_reason(settings.precision, device),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- service processes: CPU time and peak memory from /proc -------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its waited-for children (ffmpeg, ...), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime (fields 14-17)
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def mesh_pids(mesh) -> dict[str, int]:
    return {name: p.pid for name, p in mesh.procs.items() if p.poll() is None}


def mesh_cpu(mesh) -> float:
    return sum(cpu_seconds(pid) for pid in mesh_pids(mesh).values())


# --- jobs through the mesh ---------------------------------------------------------------------------------


@dataclass
class JobRecord:
    seconds: float  # GenerateVideo call -> the terminal event
    first_event: float  # call -> first event
    first_progress: float | None  # call -> first progress event
    stages: dict[str, float]  # stage -> seconds, from the events' own times
    status: str


def _stage_seconds(events) -> dict[str, float]:
    """Seconds per stage from the stage_started events' times (each stage until the next one starts,
    the last until the terminal event); `queued`: first event until the first stage."""
    from videomesh.v1 import common_pb2

    marks = [(common_pb2.Stage.Name(e.stage_started.stage).removeprefix("STAGE_").lower(), e.time.ToNanoseconds())
             for e in events if e.WhichOneof("event") == "stage_started"]  # fmt: skip
    out: dict[str, float] = {}
    if marks:
        out["queued"] = (marks[0][1] - events[0].time.ToNanoseconds()) / 1e9
    end = events[-1].time.ToNanoseconds()
    for (name, t), nxt in zip(marks, [*marks[1:], (None, end)], strict=True):
        out[name] = out.get(name, 0.0) + (nxt[1] - t) / 1e9
    return out


def run_job(client, spec, timeout: float = 900.0) -> JobRecord:
    """One job through the gateway's GenerateVideo stream, timed from the call."""
    t0 = time.perf_counter()
    first = first_progress = None
    events = []
    for ev in client.generate(spec, timeout=timeout):
        now = time.perf_counter() - t0
        if first is None:
            first = now
        if first_progress is None and ev.WhichOneof("event") == "progress":
            first_progress = now
        events.append(ev)
    seconds = time.perf_counter() - t0
    last = events[-1] if events else None
    kind = last.WhichOneof("event") if last is not None else "none"
    if kind != "completed":
        raise RuntimeError(f"bench job did not complete: {last}")
    from videomesh.v1 import common_pb2

    status = common_pb2.VideoStatus.Name(last.completed.video.status)
    return JobRecord(seconds, first, first_progress, _stage_seconds(events), status)


def run_concurrent(client, specs: list) -> tuple[float, list[JobRecord]]:
    """All `specs` submitted at once (a thread each); -> (seconds until the last finished, records)."""
    out: list[JobRecord | BaseException | None] = [None] * len(specs)

    def one(i: int) -> None:
        try:
            out[i] = run_job(client, specs[i])
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(specs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return seconds, out  # type: ignore[return-value]


class Seeds:
    """A fresh seed for every job, so that no job is answered from the gateway's result cache."""

    def __init__(self, start: int = 1000):
        self.n = start

    def __call__(self) -> int:
        self.n += 1
        return self.n


MESH_ENV = {
    "VIDEOMESH_GATEWAY_CACHE": "0",  # every job generates (seeds differ as well)
    "VIDEOMESH_GATEWAY_QC_REGENERATIONS": "0",  # a failed QC would run the job twice: the mesh only
}


@contextlib.contextmanager
def local_mesh(root: Path, extra_args: dict | None = None, timeout: float = 600.0):
    from videomesh.mesh import LocalMesh

    mesh = LocalMesh(root / "data", env=MESH_ENV, extra_args=extra_args)
    try:
        mesh.start(timeout=timeout)
        yield mesh
    finally:
        mesh.stop()


# --- 1. the same work in one process ------------------------------------------------------------------------


class InProcess:
    """The work of one default-model job, in this process, with the services' own code and settings
    (load_settings reads the same VIDEOMESH_* environment the mesh's processes read, so the precision
    and torch thread count are theirs):

    - encode prompt and negative (services/encoder TextEncoding.encode, one call for both, as the gateway);
    - denoise (engine.load_backend + backends.loop.sample, on this thread; the base frame size, frame
      count, steps and per-expert guidance the denoiser defaults to);
    - upscale and interpolate to the delivered size and fps (services/upscaler upscale_stream);
    - the gateway's finishing work per frame: the invisible watermark where the frame has room for it
      (the dev tenant's tier, pro, carries no visible mark), the H.264 MP4 encode (gateway Mp4Writer,
      ffmpeg) and the QC statistics (services/qc FrameStats), then run_checks;
    - the watermark read back from the MP4 and the file stored (LocalStorage.put_file: digests, copy).

    Not included (the mesh does them): request validation, the safety filter, the job store and events,
    gRPC and frame (de)serialisation.
    """

    def __init__(self, work_dir: Path, size: tuple[int, int] = (256, 256), fps: float = 24.0):
        from gateway.storage import LocalStorage
        from gateway.watermark import TOTAL_BITS, InvisibleWatermark
        from services.denoiser.engine import load_backend
        from services.encoder.encoder import TextEncoding
        from services.upscaler.upscaler import SpatialUpscaler
        from videomesh.launch import _threads, load_settings

        dn = load_settings("denoiser")
        _threads(dn.threads)  # what the denoiser process does first (0 = torch's default)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.encoding = TextEncoding(load_settings("encoder"))
        self.encoding.load()
        self.backend = load_backend(dn)
        self.spatial = SpatialUpscaler(load_settings("upscaler"))
        self.spatial.load()
        qc = load_settings("qc")
        self.thresholds, self.faces = qc.thresholds(), qc.faces
        gw = load_settings("gateway")
        self.watermark = InvisibleWatermark(gw.watermark_key)
        self.mark = gw.invisible_watermark and (size[0] // 8) * (size[1] // 8) >= 4 * TOTAL_BITS
        self.storage = LocalStorage(self.work_dir / "videos")
        self.size, self.fps = size, fps
        self.runs = 0

    def job(self, prompt: str, negative: str, seed: int, steps: int = 0):
        from services.denoiser.backends.base import DenoiseJob

        e = self.encoding.encode([prompt, negative])
        s = self.backend.supports()
        width, height = s.default_size
        return DenoiseJob(text=e.states[0:1], text_mask=e.mask[0:1], negative=e.states[1:2],
                          negative_mask=e.mask[1:2], frames=s.default_frames, height=height, width=width,
                          seed=seed, steps=steps or s.default_steps, guidance=0.0)  # fmt: skip

    def run(self, prompt: str, negative: str, seed: int, steps: int = 0) -> dict[str, float]:
        """One job; -> seconds per stage and in all ("total")."""
        from gateway.gateway import expects_motion
        from gateway.media import Mp4Writer, iter_frames
        from gateway.watermark import payload_for
        from services.denoiser.backends.loop import sample
        from services.qc.checks import FrameStats, run_checks
        from services.upscaler.upscaler import UpscalePlan, upscale_stream

        secs: dict[str, float] = {}
        t = t_start = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            secs[name] = now - t
            t = now

        job = self.job(prompt, negative, seed, steps)
        lap("text_encoding")
        self.backend.check_request(job, self.encoding.name)
        base = sample(self.backend, job)
        lap("denoising")
        s = self.backend.supports()
        w, h = self.size
        out_frames = int(round(len(base) / s.fps * self.fps))
        plan = UpscalePlan(input_frames=len(base), input_fps=s.fps, width=w, height=h, output_frames=out_frames,
                           output_fps=self.fps)  # fmt: skip
        self.runs += 1
        video_id = f"bench-{self.runs}"
        payload = payload_for(video_id) if self.mark else ""
        tmp = self.work_dir / f"{video_id}.mp4"
        writer = Mp4Writer(tmp, width=w, height=h, fps=self.fps)
        stats = FrameStats(self.thresholds, fps=self.fps, faces=self.faces)
        for frame in upscale_stream(plan, iter(base), self.spatial):
            if payload:
                frame = self.watermark.embed(frame, payload)
            writer.write(frame)
            stats.add(frame)
        lap("upscaling")
        run_checks(stats, fps=self.fps, expect_motion=expects_motion(prompt), th=self.thresholds)
        lap("quality_check")
        writer.close()
        lap("muxing")
        if payload:
            self.watermark.extract(iter_frames(tmp))
        self.storage.put_file(f"{video_id}.mp4", tmp)
        tmp.unlink(missing_ok=True)
        lap("storing")
        secs["total"] = time.perf_counter() - t_start
        return secs


def mesh_figures(figs: Figures, opts: Options, work: Path, log: Callable[[str], None]) -> None:
    """Sections 1, 2, 3 and 6 on one mesh of the default model.

    1. A warm-up job each way, then `opts.repeats` pairs: one job through the mesh (the GenerateVideo
       stream, from the call to the terminal event: validation, queueing, every service, the MP4
       stored), then the same job in this process (InProcess). `mesh_over_inprocess` = per-pair ratio.
    2. `opts.rounds` rounds of: N jobs one after the other, then N jobs at once (N = opts.concurrent: 8; a
       thread each). Throughput in clips/min both ways; CPU-seconds per job = the CPU time every mesh
       process used (/proc/<pid>/stat utime+stime, with their waited-for children such as ffmpeg)
       over the sequential run / N; the CPU limit = cores / CPU-seconds per job (clips/s);
       `concurrent_share_of_cpu_limit` = concurrent throughput / that limit.
    3. Per-stage seconds (from the stage_started events' times) and the time from the call to the first
       event and to the first progress event, over the jobs of 1 (single jobs).
    6. VmHWM of every service process after all of it.
    """
    from videomesh.client import VideoClient
    from videomesh.v1 import common_pb2

    seeds = Seeds()

    def spec():
        return common_pb2.VideoSpec(prompt=PROMPT, negative_prompt=NEGATIVE, seed=seeds(), width=256, height=256,
                                    num_steps=opts.steps)  # fmt: skip

    t0 = time.perf_counter()
    inproc = InProcess(work / "inprocess")
    log(f"in-process pipeline loaded ({time.perf_counter() - t0:.0f} s); starting the mesh")
    with local_mesh(work / "mesh") as mesh:
        log(f"mesh up ({time.perf_counter() - t0:.0f} s)")
        with VideoClient(mesh.addresses["gateway"], mesh.api_key) as client:
            run_job(client, spec())  # warm-up: first-call costs (channels, kernels, ffmpeg) on both sides
            inproc.run(PROMPT, NEGATIVE, seeds(), steps=2)
            mesh_s, inproc_s, records, in_stages = [], [], [], []
            repeats = opts.repeats
            for i in range(repeats):
                r = run_job(client, spec())
                records.append(r)
                mesh_s.append(r.seconds)
                st = inproc.run(PROMPT, NEGATIVE, seeds(), steps=opts.steps)
                in_stages.append(st)
                inproc_s.append(st["total"])
                log(f"  mesh vs in-process {i + 1}/{repeats}: {r.seconds:.2f} s vs {st['total']:.2f} s")
            figs.add("mesh_job_s", mesh_s, "s")
            figs.add("inprocess_job_s", inproc_s, "s")
            figs.ratio("mesh_over_inprocess", mesh_s, inproc_s)
            figs.add("time_to_first_event_s", [r.first_event for r in records], "s")
            figs.add("time_to_first_progress_s", [r.first_progress for r in records if r.first_progress], "s")
            for stage in sorted({k for r in records for k in r.stages}):
                figs.add(f"mesh_stage_{stage}_s", [r.stages.get(stage, 0.0) for r in records], "s")
            for stage in in_stages[0]:
                if stage != "total":
                    figs.add(f"inprocess_stage_{stage}_s", [s[stage] for s in in_stages], "s")
            figs.details["mesh_job_statuses"] = {s: sum(r.status == s for r in records) for s in
                                                 {r.status for r in records}}  # fmt: skip
            del inproc  # its memory and threads are not the mesh's business any more

            # 2. n one after the other vs n at once
            n, rounds = opts.concurrent, opts.rounds
            seq_rate, conc_rate, cpu_per_job, conc_cpu_per_job, shares, conc_over_seq = [], [], [], [], [], []
            n_cores = cores()
            for i in range(rounds):
                c0 = mesh_cpu(mesh)
                t = time.perf_counter()
                for _ in range(n):
                    run_job(client, spec())
                seq_s = time.perf_counter() - t
                cpu_job = (mesh_cpu(mesh) - c0) / n
                c0 = mesh_cpu(mesh)
                conc_s, _ = run_concurrent(client, [spec() for _ in range(n)])
                conc_cpu = (mesh_cpu(mesh) - c0) / n
                seq_rate.append(n / seq_s * 60)
                conc_rate.append(n / conc_s * 60)
                cpu_per_job.append(cpu_job)
                conc_cpu_per_job.append(conc_cpu)
                limit = n_cores / cpu_job  # clips per second the cores allow at this CPU cost
                shares.append((n / conc_s) / limit)
                conc_over_seq.append(seq_s / conc_s)
                log(f"  {n} one after the other vs at once {i + 1}/{rounds}: {seq_rate[-1]:.1f} vs "
                    f"{conc_rate[-1]:.1f} clips/min; {cpu_job:.2f} CPU-s/job; share of limit {shares[-1]:.2f}")  # fmt: skip
            figs.details["concurrent_jobs"] = n
            figs.add("sequential_clips_per_min", seq_rate, "clips/min")
            figs.add("concurrent_clips_per_min", conc_rate, "clips/min")
            figs.add("concurrent_over_sequential", conc_over_seq, "ratio")
            figs.add("cpu_seconds_per_job_sequential", cpu_per_job, "CPU-s")
            figs.add("cpu_seconds_per_job_concurrent", conc_cpu_per_job, "CPU-s")
            figs.add("cpu_limit_clips_per_min", [n_cores / c * 60 for c in cpu_per_job], "clips/min")
            r = figs.add("concurrent_share_of_cpu_limit", shares, "ratio")
            figs.top["concurrent_share_of_cpu_limit"] = r["median"]

            # 6. peak memory per service
            for name, pid in mesh_pids(mesh).items():
                mib = peak_rss_mib(pid)
                if mib is not None:
                    figs.details[f"peak_rss_mib_{name}"] = {"min": mib, "median": mib, "n": 1, "unit": "MiB"}
    mib = peak_rss_mib(os.getpid())
    if mib is not None:
        figs.details["peak_rss_mib_bench_process"] = {"min": mib, "median": mib, "n": 1, "unit": "MiB",
                                                      "note": "this process: the in-process pipeline and the client"}  # fmt: skip


# --- 4. the denoiser against the best GEMM ----------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def gemm_gflops(dtype, device, sizes: Iterable[int], seconds: float) -> dict[int, float]:
    """Square matmuls: GFLOP/s per size (2 n^3 per product), each timed over >= `seconds`."""
    import torch

    out = {}
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            torch.matmul(a, b)
            _sync(device)
            reps, t0 = 0, time.perf_counter()
            while True:
                torch.matmul(a, b)
                reps += 1
                if reps % 4 == 0:
                    _sync(device)
                    if time.perf_counter() - t0 >= seconds:
                        break
            out[n] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return out


def count_generation_flops(backend, job) -> tuple[float, dict]:
    """FLOPs of one generation: each distinct forward (batch key: expert, CFG batch or not) counted
    once with torch's FlopCounterMode, times how many times the sampler runs it. The schedule is
    walked with the real sampler steps; forwards of a key already counted are not run (a zero
    prediction advances the state: keys depend on the step, not on the latents' values)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    state = backend.start(job)
    per_key: dict = {}
    counts: dict = {}
    with torch.inference_mode():
        while not state.done:
            key = backend.batch_key(state)
            expert = backend.expert_for(state)
            if key not in per_key:
                fc = FlopCounterMode(display=False)
                with fc:
                    pred = backend.forward(expert, [state])[0]
                per_key[key] = fc.get_total_flops()
            else:
                pred = torch.zeros_like(state.latents)
            counts[key] = counts.get(key, 0) + 1
            backend.step(state, pred)
    total = sum(per_key[k] * counts[k] for k in per_key)
    return float(total), {str(k): {"flops_per_forward": per_key[k], "forwards": counts[k]} for k in per_key}


def gemm_figures(
    figs: Figures, opts: Options, log: Callable[[str], None] = print, model: str | None = None
) -> None:
    """Section 4. Best GEMM = the best GFLOP/s of square matmuls (a few sizes) in the precision the
    denoiser chose on its device; the denoiser = FLOPs of one generation (count_generation_flops: the
    CFG-batched forwards) / the seconds of that generation in this process (loop.sample: every step,
    the sampler and the frames' conversion). Measured interleaved: GEMM sizes, generation, ...
    `denoiser_share_of_gemm` = per-pair denoiser GFLOP/s / best GEMM GFLOP/s. The text states are
    random, 12 tokens (about a prompt's; their values do not change the work). `model` overrides the
    denoiser setting (the unit test's smoke run uses the tiny model)."""
    import torch

    from services.denoiser.backends.loop import sample
    from services.denoiser.engine import load_backend
    from videomesh.launch import _threads, load_settings

    overrides = {"model": model} if model else {}
    dn = load_settings("denoiser", **overrides)
    _threads(dn.threads)
    backend = load_backend(dn)
    engine = backend.engine
    device, dtype = engine.device, engine.dtype
    job = _random_job(backend, seed=7, steps=opts.steps)
    flops, per_key = count_generation_flops(backend, job)
    figs.details["denoiser_flops_per_generation"] = {"min": flops, "median": flops, "n": 1, "unit": "FLOP",
                                                     "forwards": per_key}  # fmt: skip
    sizes = (512, 1024) if opts.quick else (256, 512, 1024, 2048)
    sample(backend, _random_job(backend, seed=8, steps=2))  # warm-up
    gemm, gen_s, den, share = [], [], [], []
    repeats = opts.repeats
    for i in range(repeats):
        g = gemm_gflops(dtype, device, sizes, 0.1 if opts.quick else 0.3)
        gemm.append(max(g.values()))
        t0 = time.perf_counter()
        sample(backend, job)
        gen_s.append(time.perf_counter() - t0)
        den.append(flops / gen_s[-1] / 1e9)
        share.append(den[-1] / gemm[-1])
        sizes_s = ", ".join(f"{k}: {v:.0f}" for k, v in g.items())
        log(f"  GEMM vs denoiser {i + 1}/{repeats}: best GEMM {gemm[-1]:.0f} GFLOP/s ({sizes_s}); "
            f"denoiser {den[-1]:.1f} GFLOP/s ({gen_s[-1]:.2f} s)")  # fmt: skip
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    figs.add(f"gemm_best_gflops_{dt}", gemm, "GFLOP/s")
    figs.details["gemm_sizes"] = list(sizes)
    figs.add("denoiser_generation_s", gen_s, "s")
    figs.add("denoiser_gflops", den, "GFLOP/s")
    r = figs.add("denoiser_share_of_gemm", share, "ratio")
    figs.top["denoiser_share_of_gemm"] = r["median"]


def _random_job(backend, seed: int, steps: int | None = None):
    """A DenoiseJob of the backend's defaults with text states of the right width (their values do not
    change the work)."""
    import torch

    from services.denoiser.backends.base import DenoiseJob

    s = backend.supports()
    g = torch.Generator().manual_seed(seed)
    length = s.text_length or 12
    width, height = s.default_size
    return DenoiseJob(torch.randn(1, length, s.text_dim, generator=g), torch.ones(1, length, dtype=torch.bool),
                      torch.zeros(1, length, s.text_dim), torch.ones(1, length, dtype=torch.bool), s.default_frames,
                      height, width, seed, steps or s.default_steps, 0.0)  # fmt: skip


# --- 5. step caching --------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def sample_counting(backend, job) -> tuple[np.ndarray, int, int]:
    """backends.loop.sample, step for step, also returning the steps the step cache (if on) reused and
    computed."""
    from services.denoiser.backends.loop import advance

    state = backend.start(job)
    while not state.done:
        advance(backend, [state])
    frames = np.concatenate(list(backend.decode(state)))
    cache = getattr(state, "cache", None)
    return frames, getattr(cache, "reused", 0), getattr(cache, "computed", state.total)


def adherence(summary_: dict) -> dict[str, float]:
    """Mean score (0..1) per attribute over the languages, and their mean ("all")."""
    table = summary_["table"]
    out = {k: float(np.mean([table[lang][k] for lang in table])) for k in ("color", "shape", "motion")}
    out["all"] = float(np.mean(list(out.values())))
    return out


def step_cache_figures(quick: bool, threshold: float = STEP_CACHE_THRESHOLD, *, repeats: int = 1, steps: int = 0,
                       log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Section 5: step caching at `threshold` (DenoiseJob.step_cache; 0 = off) against none.

    - speed-up: in-process generations (prompts encoded by the encoder, the default model's defaults),
      uncached and cached interleaved per prompt (3 prompts in --quick, else 8; `repeats` passes over
      them); speed-up = per-pair uncached / cached seconds;
    - PSNR of the cached frames against the uncached frames of the same prompt and seed, over several
      prompts (min and median);
    - adherence: services/denoiser/evaluate.run through the mesh without and with step caching (in
      --quick 8 prompts per language, the fewest that cover every colour, shape and motion; else 24);
      delta = cached - uncached mean of colour/shape/motion over the languages, in percentage points.

    -> {"speedup", "psnr_db", "adherence_delta_points", "details": {...}, "unavailable": {...}}; a
    figure this tree cannot measure is None with the reason in "unavailable" (nothing is estimated)."""
    from services.denoiser.backends.base import DenoiseJob

    out: dict = {"speedup": None, "psnr_db": None, "adherence_delta_points": None, "details": {},
                 "unavailable": {}}  # fmt: skip
    if "step_cache" not in {f.name for f in dataclasses.fields(DenoiseJob)}:
        why = "DenoiseJob has no step_cache field: step caching is not in this tree"
        out["unavailable"] = {"speedup": why, "psnr_db": why, "adherence_delta_points": why}
        return out
    from services.denoiser.engine import load_backend
    from services.encoder.encoder import TextEncoding
    from videomesh.launch import _threads, load_settings
    from videomesh.world import heldout_prompts

    dn = load_settings("denoiser")
    _threads(dn.threads)
    enc = TextEncoding(load_settings("encoder"))
    enc.load()
    backend = load_backend(dn)
    s = backend.supports()
    n_prompts = 3 if quick else 8
    prompts = [p for p, _ in heldout_prompts("en", 8, seed=1)][:n_prompts]
    reps = max(1, repeats)
    plain_s, cached_s, psnrs, reused_share = [], [], [], []

    def job(prompt: str, seed: int, cache: float):
        e = enc.encode([prompt, ""])
        width, height = s.default_size
        return DenoiseJob(text=e.states[0:1], text_mask=e.mask[0:1], negative=e.states[1:2],
                          negative_mask=e.mask[1:2], frames=s.default_frames, height=height, width=width,
                          seed=seed, steps=steps or s.default_steps, guidance=0.0, step_cache=cache)  # fmt: skip

    sample_counting(backend, dataclasses.replace(job(prompts[0], 0, 0.0), steps=2))  # warm-up
    for rep in range(reps):
        for i, prompt in enumerate(prompts):
            seed = 100 + i
            t0 = time.perf_counter()
            plain, _, _ = sample_counting(backend, job(prompt, seed, 0.0))
            plain_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cached, reused, computed = sample_counting(backend, job(prompt, seed, threshold))
            cached_s.append(time.perf_counter() - t0)
            reused_share.append(reused / max(1, reused + computed))
            if rep == 0:
                psnrs.append(psnr(cached, plain))
            log(f"  step cache {rep * len(prompts) + i + 1}/{reps * len(prompts)}: {plain_s[-1]:.2f} s uncached, "
                f"{cached_s[-1]:.2f} s cached ({reused} steps reused)" + (f", PSNR {psnrs[-1]:.1f} dB" if rep == 0 else ""))  # fmt: skip
    d = out["details"]
    d["step_cache_threshold"] = threshold
    d["step_cache_uncached_s"] = summary(plain_s, "s")
    d["step_cache_cached_s"] = summary(cached_s, "s")
    d["step_cache_speedup"] = summary(ratios(plain_s, cached_s), "ratio")
    d["step_cache_reused_share"] = summary(reused_share, "share of steps")
    finite = [p for p in psnrs if np.isfinite(p)]
    d["step_cache_psnr_db"] = summary(finite, "dB")
    d["step_cache_psnr_db"]["identical_clips"] = len(psnrs) - len(finite)
    out["speedup"] = d["step_cache_speedup"]["median"]
    out["psnr_db"] = d["step_cache_psnr_db"]["median"] if finite else float("inf")

    from services.denoiser import evaluate

    if "step_cache" not in inspect.signature(evaluate.run).parameters:
        out["unavailable"]["adherence_delta_points"] = (
            "services/denoiser/evaluate.run takes no step_cache parameter yet: the adherence eval cannot "
            "ask for step caching"
        )
        return out
    per_lang = 8 if quick else 24
    scores = {}
    for name, cache in (("uncached", 0.0), ("cached", threshold)):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            res = evaluate.run(per_lang, 0, None, "256x256", step_cache=cache)
        scores[name] = adherence(res)
        d[f"step_cache_adherence_{name}"] = scores[name]
        log(f"  adherence eval {name}: {scores[name]['all']:.1%} ({per_lang} prompts per language, "
            f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
    delta = {k: 100 * (scores["cached"][k] - scores["uncached"][k]) for k in scores["cached"]}
    d["step_cache_adherence_delta_points_by_attribute"] = delta
    d["step_cache_adherence_prompts_per_language"] = per_lang
    out["adherence_delta_points"] = delta["all"]
    return out


# --- 7. the tiny Wan model ----------------------------------------------------------------------------------


def _save_tiny_wan() -> Callable[[Path], Path]:
    """tests/wan_tiny.save_tiny_wan: the bench runs from a source checkout, where tests/ sits beside
    videomesh/; ImportError naming the problem elsewhere."""
    try:
        from tests.wan_tiny import save_tiny_wan
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        if not (root / "tests" / "wan_tiny.py").exists():
            raise ImportError("tests/wan_tiny.py (the tiny random Wan builder) is not here: run the bench "
                              "from a source checkout of videomesh") from None  # fmt: skip
        sys.path.insert(0, str(root))
        from tests.wan_tiny import save_tiny_wan
    return save_tiny_wan


def wan_figures(figs: Figures, opts: Options, work: Path, log: Callable[[str], None]) -> None:
    """Section 7, with the tiny random Wan2.2 A14B model (tests/wan_tiny.py) in the diffusers layout.

    Latency: one job through the mesh (`--model wan2.2 --model-dir DIR`: UMT5 encoder service, the Wan
    denoiser service, the upscaler passing frames through at the native size and rate, QC, the MP4
    stored; GenerateVideo call to the terminal event) against `WanPipeline.from_pretrained(DIR)` called
    in this process with the same prompt, negative, size, frames, steps, guidance and seed (its own
    UMT5 encode, the two experts, the VAE decode to numpy frames), in the precision the mesh's denoiser
    chose (load_backend), the VAE in fp32 as the backend runs it. Interleaved: mesh, pipeline, ...
    `wan_mesh_over_pipeline` = per-pair ratio.
    Throughput (`opts.rounds` rounds): N jobs at once through the mesh against N WanPipeline calls one
    after the other (N = opts.concurrent: 8), interleaved; `wan_concurrent_over_sequential` = per-pair ratio of clips/s."""
    import torch

    try:
        import diffusers  # noqa: F401
    except ImportError:
        figs.missing(("wan_mesh_over_pipeline", "wan_concurrent_over_sequential"),
                     "diffusers is not installed (pip install -e '.[wan]')")  # fmt: skip
        return
    try:
        save_tiny_wan = _save_tiny_wan()
    except ImportError as e:
        figs.missing(("wan_mesh_over_pipeline", "wan_concurrent_over_sequential"), str(e))
        return
    from diffusers import AutoencoderKLWan, WanPipeline

    from services.denoiser.engine import load_backend
    from videomesh.cli import model_args
    from videomesh.client import VideoClient
    from videomesh.launch import load_settings
    from videomesh.v1 import common_pb2

    wan_dir = save_tiny_wan(work / "tiny-wan")
    settings = load_settings("denoiser", model="wan2.2", model_dir=wan_dir)
    dtype = load_backend(settings).dtype  # the precision the mesh's denoiser runs it in
    vae = AutoencoderKLWan.from_pretrained(wan_dir, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(wan_dir, vae=vae, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    j = WAN_JOB
    (w, h), seeds = j["size"], Seeds(5000)
    figs.details["wan_job"] = {**j, "size": f"{w}x{h}", "dtype": str(dtype).removeprefix("torch.")}

    def spec():
        return common_pb2.VideoSpec(prompt=j["prompt"], negative_prompt=j["negative"], seed=seeds(),
                                    num_steps=j["steps"], guidance_scale=j["guidance"],
                                    guidance_scale_2=j["guidance_2"], width=w, height=h, num_frames=j["frames"],
                                    fps=j["fps"])  # fmt: skip

    def pipeline_call() -> float:
        t0 = time.perf_counter()
        pipe(prompt=j["prompt"], negative_prompt=j["negative"], height=h, width=w, num_frames=j["frames"],
             num_inference_steps=j["steps"], guidance_scale=j["guidance"], guidance_scale_2=j["guidance_2"],
             generator=torch.Generator().manual_seed(seeds()), output_type="np")  # fmt: skip
        return time.perf_counter() - t0

    with local_mesh(work / "wan-mesh", extra_args=model_args("wan2.2", str(wan_dir))) as mesh:
        with VideoClient(mesh.addresses["gateway"], mesh.api_key) as client:
            run_job(client, spec())  # warm-up both
            pipeline_call()
            mesh_s, pipe_s = [], []
            repeats, n = opts.repeats, opts.concurrent
            for i in range(repeats):
                mesh_s.append(run_job(client, spec()).seconds)
                pipe_s.append(pipeline_call())
                log(
                    f"  tiny Wan mesh vs WanPipeline {i + 1}/{repeats}: {mesh_s[-1]:.2f} s vs {pipe_s[-1]:.2f} s"
                )
            figs.add("wan_mesh_job_s", mesh_s, "s")
            figs.add("wan_pipeline_s", pipe_s, "s")
            figs.ratio("wan_mesh_over_pipeline", mesh_s, pipe_s)
            conc, seq = [], []
            for i in range(opts.rounds):
                conc_s, _ = run_concurrent(client, [spec() for _ in range(n)])
                seq_s = sum(pipeline_call() for _ in range(n))
                conc.append(n / conc_s * 60)
                seq.append(n / seq_s * 60)
                log(f"  tiny Wan {n} at once (mesh) vs one after the other (WanPipeline) {i + 1}/{opts.rounds}: "
                    f"{conc[-1]:.1f} vs {seq[-1]:.1f} clips/min")  # fmt: skip
            figs.add("wan_mesh_concurrent_clips_per_min", conc, "clips/min")
            figs.add("wan_pipeline_sequential_clips_per_min", seq, "clips/min")
            figs.ratio("wan_concurrent_over_sequential", conc, seq)
            for name, pid in mesh_pids(mesh).items():
                mib = peak_rss_mib(pid)
                if mib is not None:
                    figs.details[f"wan_peak_rss_mib_{name}"] = {
                        "min": mib,
                        "median": mib,
                        "n": 1,
                        "unit": "MiB",
                    }


# --- the command -------------------------------------------------------------------------------------------


def run(sections: Iterable[str], opts: Options, log: Callable[[str], None] = print, figs: Figures | None = None,
        after_section: Callable[[Figures], None] | None = None) -> Figures:  # fmt: skip
    """Run the chosen sections in order into `figs`; a section that fails is recorded as unavailable, not
    fatal; after_section(figs) after each (main writes the JSON so far)."""
    figs = figs if figs is not None else Figures()
    sections = list(sections)
    with tempfile.TemporaryDirectory(prefix="videomesh-bench-") as d:
        work = Path(d)
        home = os.environ.get("VIDEOMESH_HOME")
        # LocalMesh saves the dev key and the gateway address in VIDEOMESH_HOME: a scratch one, so a
        # `videomesh up` of the user's keeps its own
        os.environ["VIDEOMESH_HOME"] = str(work / "home")
        try:
            for name in sections:
                t0 = time.perf_counter()
                log(f"[{name}]")
                try:
                    if name == "mesh":
                        mesh_figures(figs, opts, work, log)
                    elif name == "gemm":
                        gemm_figures(figs, opts, log)
                    elif name == "step_cache":
                        sc = step_cache_figures(opts.quick, opts.step_cache, steps=opts.steps, log=log)
                        figs.details.update(sc["details"])
                        figs.top["step_cache_speedup"] = sc["speedup"]
                        figs.top["step_cache_adherence_delta_points"] = sc["adherence_delta_points"]
                        for k, why in sc["unavailable"].items():
                            key = {"speedup": "step_cache_speedup",
                                   "adherence_delta_points": "step_cache_adherence_delta_points"}.get(k)  # fmt: skip
                            if key:
                                figs.unavailable[key] = why
                    elif name == "wan":
                        wan_figures(figs, opts, work, log)
                    else:
                        raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
                except ValueError:
                    raise
                except Exception as e:  # noqa: BLE001 - the other sections still run
                    log(f"  {name} failed: {type(e).__name__}: {e}")
                    figs.details[f"{name}_error"] = f"{type(e).__name__}: {e}"
                    for k in _keys_of(name):
                        if figs.top.get(k) is None:
                            figs.missing([k], f"the {name} section failed: {type(e).__name__}: {e}")
                figs.seconds[name] = round(time.perf_counter() - t0, 1)
                shutil.rmtree(work / "mesh", ignore_errors=True)
                if after_section is not None:
                    after_section(figs)
        finally:
            if home is None:
                os.environ.pop("VIDEOMESH_HOME", None)
            else:
                os.environ["VIDEOMESH_HOME"] = home
    return figs


def _keys_of(section: str) -> tuple[str, ...]:
    return {
        "mesh": ("mesh_over_inprocess", "concurrent_share_of_cpu_limit"),
        "gemm": ("denoiser_share_of_gemm",),
        "step_cache": ("step_cache_speedup", "step_cache_adherence_delta_points"),
        "wan": ("wan_mesh_over_pipeline", "wan_concurrent_over_sequential"),
    }.get(section, ())


def _quiet_progress_bars() -> None:
    """transformers' and diffusers' loading bars would bury the bench's own lines."""
    for mod in ("transformers.utils.logging", "diffusers.utils.logging"):
        with contextlib.suppress(Exception):
            __import__(mod, fromlist=["disable_progress_bar"]).disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="videomesh bench",
        description="performance ratios of the mesh (issue #20): a table, and JSON with --json",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats and prompts: under 10 minutes on 2 cores"
    )
    p.add_argument(
        "--repeats", type=int, default=0, help="interleaved pairs per comparison (default 5, --quick 2)"
    )
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default all)")  # fmt: skip
    p.add_argument("--step-cache", type=float, default=STEP_CACHE_THRESHOLD,
                   help=f"the step-cache threshold measured (default {STEP_CACHE_THRESHOLD:g})")  # fmt: skip
    p.add_argument("--concurrent", type=int, default=CONCURRENT,
                   help=f"jobs at once in the throughput comparisons (default {CONCURRENT})")  # fmt: skip
    p.add_argument("--steps", type=int, default=0,
                   help="default-model steps per job (default: the model's); fewer only to try the bench out")  # fmt: skip
    a = p.parse_args(argv)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if a.repeats < 0 or a.concurrent < 1 or a.steps < 0:
        p.error("--repeats, --concurrent and --steps must be positive")
    opts = Options(repeats=a.repeats or (2 if a.quick else 5), quick=a.quick, concurrent=a.concurrent,
                   steps=a.steps, step_cache=a.step_cache)  # fmt: skip
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    _quiet_progress_bars()
    machine = describe_machine()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu'] or 'none'}, "
        f"precision {machine['precision']}")  # fmt: skip
    figs = Figures()

    def document(**run_info) -> dict:
        doc = to_json(machine, figs, opts)
        doc["run"].update(sections=sections, seconds=round(time.perf_counter() - t0, 1), **run_info)
        return doc

    def save_so_far(_figs: Figures) -> None:  # an interrupted run keeps the sections it finished
        if a.json:
            write_json(a.json, document(complete=False))

    try:
        run(sections, opts, log, figs, after_section=save_so_far)
    except KeyboardInterrupt:
        log("interrupted: the figures of the finished sections follow")
        doc = document(complete=False, interrupted=True)
        render(doc)
        if a.json:
            write_json(a.json, doc)
            print(f"wrote {a.json} (incomplete)", flush=True)
        return 130
    doc = document(complete=True)
    render(doc)
    if a.json:
        write_json(a.json, doc)
        print(f"wrote {a.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
