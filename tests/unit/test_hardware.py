"""Precision by capability: bf16 on the CPU only with AMX-BF16 (emulated bf16 is ~28x slower here)."""

import torch

from services.denoiser import engine
from videomesh import hardware


def test_cpu_precision_follows_amx(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_bf16_is_fast", lambda: True)
    assert engine.pick_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_bf16_is_fast", lambda: False)
    assert engine.pick_dtype("auto", cpu) == torch.float32
    assert engine.pick_dtype("bf16", cpu) == torch.bfloat16  # an explicit choice wins
    assert engine.pick_dtype("fp32", cpu) == torch.float32


def test_flags_come_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Test CPU\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    real = hardware.Path

    monkeypatch.setattr(hardware, "Path", lambda p: real(info) if p == "/proc/cpuinfo" else real(p))
    hardware.cpu_flags.cache_clear()
    try:
        assert hardware.cpu_bf16_is_fast()
        assert hardware.describe_cpu() == "Test CPU (amx_bf16, avx512f, avx2)"
    finally:
        hardware.cpu_flags.cache_clear()
