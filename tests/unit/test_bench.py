"""`videomesh bench`: the JSON it writes and the table it prints (pure functions), and a real smoke run
of its cheapest section (GEMM against the denoiser, slow)."""

from __future__ import annotations

import io
import json

import pytest

from videomesh import bench

MACHINE = {"cpu_model": "Test CPU", "cpu": "Test CPU (avx2)", "cores": 2, "amx_bf16": False, "avx512_bf16": False,
           "gpu": None, "torch": "2.13.0", "device": "cpu", "precision": "fp32", "precision_reason": "auto",
           "torch_threads": 2}  # fmt: skip


def _figures() -> bench.Figures:
    figs = bench.Figures()
    figs.ratio("mesh_over_inprocess", [4.0, 5.0, 4.5], [3.2, 4.0, 4.5])
    figs.add("mesh_job_s", [4.0, 5.0, 4.5], "s")
    figs.add("time_to_first_event_s", [0.01, 0.02], "s")
    figs.top["denoiser_share_of_gemm"] = figs.add("denoiser_share_of_gemm", [0.2, 0.25], "ratio")["median"]
    figs.missing(["step_cache_speedup"], "DenoiseJob has no step_cache field")
    return figs


def test_json_has_every_key_the_machine_and_the_raw_figures(tmp_path):
    doc = bench.to_json(MACHINE, _figures(), bench.Options(repeats=3, quick=True))
    for key in bench.TOP_KEYS:
        assert key in doc
    assert doc["mesh_over_inprocess"] == pytest.approx(1.25)  # median of 1.25, 1.25, 1.0
    assert doc["details"]["mesh_over_inprocess"]["min"] == pytest.approx(1.0)
    assert doc["details"]["mesh_job_s"] == {"min": 4.0, "median": 4.5, "n": 3, "samples": [4.0, 5.0, 4.5],
                                            "unit": "s"}  # fmt: skip
    assert doc["denoiser_share_of_gemm"] == pytest.approx(0.225)
    # not measured: null, and why
    assert doc["step_cache_speedup"] is None
    assert "step_cache" in doc["unavailable"]["step_cache_speedup"]
    assert doc["wan_mesh_over_pipeline"] is None and doc["unavailable"]["wan_mesh_over_pipeline"]
    for k in ("cpu_model", "cores", "amx_bf16", "avx512_bf16", "gpu", "torch", "precision"):
        assert k in doc["machine"]
    assert doc["goals"]["mesh_over_inprocess"] == {"goal": "<= 1.05", "met": False}
    assert doc["goals"]["denoiser_share_of_gemm"]["met"] is False
    assert doc["goals"]["step_cache_speedup"]["met"] is None
    assert doc["run"]["repeats"] == 3 and doc["run"]["quick"] is True
    path = tmp_path / "out" / "bench.json"
    bench.write_json(path, doc)
    assert json.loads(path.read_text())["mesh_over_inprocess"] == pytest.approx(1.25)


def test_the_real_machine_is_described():
    m = bench.describe_machine()
    assert m["cores"] >= 1 and m["precision"] in ("fp32", "bf16", "fp16")
    assert isinstance(m["amx_bf16"], bool) and isinstance(m["avx512_bf16"], bool)


def test_the_table_renders():
    from rich.console import Console

    out = io.StringIO()
    doc = bench.to_json(MACHINE, _figures(), bench.Options())
    bench.render(doc, Console(file=out, width=160, color_system=None))
    text = out.getvalue()
    assert "Test CPU" in text and "2 cores" in text
    assert "mesh / in-process latency" in text and "1.250" in text
    assert "time_to_first_event_s" in text
    assert "step_cache_speedup: not available" in text


def test_goals_and_ratios():
    assert bench.ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert bench.goal_met("step_cache_adherence_delta_points", -1.5) is True
    assert bench.goal_met("step_cache_adherence_delta_points", 2.5) is False
    assert bench.goal_met("wan_concurrent_over_sequential", 2.1) is True
    assert bench.goal_met("wan_concurrent_over_sequential", None) is None


def test_stage_seconds_from_the_events():
    from videomesh.v1 import common_pb2, gateway_pb2

    def ev(seconds: float, **kw):
        e = gateway_pb2.VideoEvent(**kw)
        e.time.FromNanoseconds(int(seconds * 1e9))
        return e

    events = [
        ev(10.0, queued=gateway_pb2.Queued()),
        ev(10.5, stage_started=gateway_pb2.StageStarted(stage=common_pb2.STAGE_TEXT_ENCODING)),
        ev(10.6, stage_started=gateway_pb2.StageStarted(stage=common_pb2.STAGE_DENOISING)),
        ev(12.6, stage_started=gateway_pb2.StageStarted(stage=common_pb2.STAGE_UPSCALING)),
        ev(13.0, completed=gateway_pb2.Completed()),
    ]
    got = bench._stage_seconds(events)
    assert got == pytest.approx({"queued": 0.5, "text_encoding": 0.1, "denoising": 2.0, "upscaling": 0.4})


@pytest.mark.slow
def test_gemm_section_runs(capsys):
    """The cheapest real section end to end: GEMM GFLOP/s against the tiny denoiser's FLOP/s."""
    figs = bench.Figures()
    bench.gemm_figures(figs, bench.Options(repeats=1, quick=True), log=print, model="tiny")
    share = figs.top["denoiser_share_of_gemm"]
    assert share is not None and 0 < share < 10
    assert figs.details["denoiser_flops_per_generation"]["median"] > 0
    assert any(k.startswith("gemm_best_gflops_") for k in figs.details)
