"""The CLI as a user runs it: real processes, one per service."""

import os
import signal
import subprocess
import sys
import time

import pytest

from gateway.media import probe

pytestmark = pytest.mark.slow


def _env(tmp_path):
    return {**os.environ, "VIDEOMESH_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}


def _cli(*args):
    return [sys.executable, "-m", "videomesh.cli", *args]


def test_demo_writes_playable_mp4(tmp_path):
    out = tmp_path / "clip.mp4"
    r = subprocess.run(
        _cli("demo", "a purple triangle moving up on a white background", "--out", str(out), "--steps", "4",
             "--data-dir", str(tmp_path / "data"), "--quiet"),
        env=_env(tmp_path), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"wrote {out}" in r.stdout
    assert probe(out) == {"frames": 96, "fps": 24.0, "width": 256, "height": 256}


def test_up_health_generate_and_clean_stop(tmp_path):
    env = _env(tmp_path)
    up = subprocess.Popen(
        _cli("up", "--data-dir", str(tmp_path / "data")),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = None
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            lines.append(line)
            if line.startswith("gateway listening on "):
                address = line.split()[-1]
                break
            if not line and up.poll() is not None:
                break
        assert address, "".join(lines)
        h = subprocess.run(
            _cli("health", "--gateway", address), env=env, capture_output=True, text=True, timeout=60
        )
        assert h.returncode == 0, h.stdout + h.stderr
        assert h.stdout.count("SERVING") == 5
        out = tmp_path / "g.mp4"
        g = subprocess.run(_cli("generate", "a green ball moves left", "--gateway", address, "--out", str(out), "--steps", "3",
                                "--size", "128x128", "--fps", "8", "-q"), env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert g.returncode == 0, g.stderr
        assert probe(out)["frames"] == 32
        bad = subprocess.run(_cli("generate", "x", "--gateway", address, "--out", str(tmp_path / "b.mp4"), "--size", "100x100", "-q"),
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr and "256x256" in bad.stderr
        assert not (tmp_path / "b.mp4").exists()
    finally:
        up.send_signal(signal.SIGTERM)
        rc = up.wait(timeout=30)
    assert rc == 0
    # every service process is gone
    time.sleep(0.5)
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True)
    assert ps.stdout.strip() == "", ps.stdout
