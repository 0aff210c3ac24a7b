"""The reliability suite (scripts/reliability.py, `make reliability`) in its quick form: load, faults and
security against a real supervised mesh with two gateway replicas on PostgreSQL and S3. Its fuzz section
is tests/services/test_fuzz.py, which the suite runs anyway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_the_quick_reliability_suite_loses_nothing_and_refuses_every_hostile_call(tmp_path):
    out = tmp_path / "reliability.json"
    proc = subprocess.run([sys.executable, "scripts/reliability.py", "--quick", "--only", "load,faults,security",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    print(proc.stdout[-6000:])
    res = json.loads(out.read_text())
    load = res["load"]
    assert load["accepted"] > 0 and load["rejected"], load  # the trial tier's burst was exceeded
    assert load["rejected_with_retry_info"] == sum(load["rejected"].values())
    assert (
        load["lost"] == 0
        and load["duplicated"] == 0
        and load["finished"] + sum(load["failed"].values()) == load["accepted"]
    )
    assert {f["fault"] for f in res["faults"]} >= {"SIGKILL encoder", "SIGKILL denoiser", "SIGKILL upscaler",
                                                   "SIGKILL qc", "S3 stopped for 5 s", "gateway restarted (SIGTERM)",
                                                   "gateway replica SIGKILLed"}  # fmt: skip
    for f in res["faults"]:
        assert f["lost"] == 0 and f["duplicated"] == 0 and f["time_to_healthy_s"] is not None, f
    for row in res["security"]:
        assert row["calls"] > 0 and row["refused"] == row["calls"], row
    assert proc.returncode == 0 and res["ok"], res["why"]
