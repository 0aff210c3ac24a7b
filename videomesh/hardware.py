"""What this machine's CPU does fast, for choosing a precision by capability.

bf16 is only worth it on a CPU with AMX-BF16 (Sapphire Rapids and later: measured ~5x fp32 for the
default model's GEMMs). With only avx512_bf16, bf16 GEMM ran at 163 GFLOP/s against fp32's 317;
without either (AVX2 only, e.g. this AMD EPYC VM) torch emulates bf16: 8 denoiser steps of the
default model took 29.8 s in bf16 against 1.06 s in fp32 (min of 3, same process). So: bf16 on the
CPU only where AMX-BF16 is present, fp32 elsewhere.
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_is_fast() -> bool:
    """True where bf16 matmuls beat fp32 on this CPU (AMX-BF16)."""
    return "amx_bf16" in cpu_flags()


def describe_cpu() -> str:
    """One line for benchmark output: the model name and the bf16-relevant flags."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in cpu_flags()]
    return f"{name} ({', '.join(flags) or 'no AVX2'})"
