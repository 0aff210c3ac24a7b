"""The CLI as a user runs it: real processes, one per service."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _start_up(tmp_path, *extra, env=None, timeout=240):
    """`videomesh up` as a user runs it; -> (process, gateway address, its output lines so far).
    The process is terminated when no gateway address appears."""
    up = subprocess.Popen(_cli("up", "--data-dir", str(tmp_path / "data"), *extra), env=env or _env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    address, lines = None, []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        lines.append(line)
        if line.startswith("gateway listening on "):
            address = line.split()[-1]
        if line.startswith("dev tenant key in") or (not line and up.poll() is not None):
            break
    if not address:
        up.terminate()
        up.wait(timeout=60)
    assert address, "".join(lines)
    return up, address, lines


def test_up_health_generate_watch_and_clean_stop(tmp_path):
    env = _env(tmp_path)
    up, address, lines = _start_up(tmp_path, env=env)
    pids = [int(m) for m in re.findall(r"\(pid (\d+)\)", "".join(lines))]
    assert len(pids) == 5, lines  # every service's process, as `up` printed them
    saved = [tmp_path / "home" / "gateway", tmp_path / "data" / "gateway-address"]
    try:
        # the address is saved where every command finds it: no --gateway from here on
        assert [f.read_text().split()[0] for f in saved] == [address, address]
        h = subprocess.run(_cli("health"), env=env, capture_output=True, text=True, timeout=60)
        assert h.returncode == 0, h.stdout + h.stderr
        states = [line.split()[-1] for line in h.stdout.splitlines() if line.strip()]
        assert states.count("SERVING") == 5 and "NOT_SERVING" not in h.stdout, h.stdout
        out = tmp_path / "g.mp4"
        g = subprocess.run(_cli("generate", "a green ball moves left", "--out", str(out), "--steps", "3",
                                "--size", "128x128", "--fps", "8", "-q"), env=env, capture_output=True, text=True,
                           timeout=180)  # fmt: skip
        assert g.returncode == 0, g.stderr
        first = g.stdout.splitlines()[0].split()
        assert first[0] == "video" and first[1].startswith("vid_") and first[2] == "queued", g.stdout
        assert probe(out)["frames"] == 32
        # watch re-attaches to the finished job and downloads the same file again
        again = tmp_path / "again.mp4"
        w = subprocess.run(_cli("watch", first[1], "--out", str(again), "-q"), env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert w.returncode == 0, w.stderr
        assert again.read_bytes() == out.read_bytes()
        # errors in the user's words, once, before anything is created
        bad = subprocess.run(_cli("generate", "x", "--out", str(tmp_path / "b.mp4"), "--size", "100x100", "-q"),
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert bad.returncode == 1 and bad.stderr.startswith("error: --size: size 100x100 is not offered")
        assert "256x256" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "b.mp4").exists()
        strength = subprocess.run(_cli("generate", "x", "--adapter-strength", "5", "-q"), env=env,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
        assert strength.returncode == 1
        assert strength.stderr.strip() == "error: --adapter-strength must be in 0..2 (0 = 1); got 5.0"
    finally:
        up.send_signal(signal.SIGTERM)
        rc = up.wait(timeout=30)
    assert rc == 0
    assert not any(f.exists() for f in saved)  # a stopped mesh leaves no address behind
    # every service process is gone (each pid `up` printed: no process, or only its exit status left)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        time.sleep(0.1)
    assert not alive, alive
    gone = subprocess.run(_cli("health"), env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert gone.returncode == 2 and "videomesh up" in gone.stderr


def test_up_with_replicas_on_postgres_serves_any_job_from_any_gateway(tmp_path, pg):
    """`videomesh up --database URL --replicas 2 --port P`: gateways on P and P+1 over one database and
    the data dir's storage; `generate` through one, `watch` through the other (issue #21)."""
    import socket

    env = _env(tmp_path)
    for _ in range(50):  # P and P+1 free
        with socket.socket() as s1, socket.socket() as s2:
            s1.bind(("127.0.0.1", 0))
            port = s1.getsockname()[1]
            try:
                s2.bind(("127.0.0.1", port + 1))
                break
            except OSError:
                continue
    up, address, lines = _start_up(tmp_path, "--database", pg.database(), "--replicas", "2", "--port", str(port),
                                   env=env)  # fmt: skip
    try:
        text = "".join(lines)
        assert address == f"127.0.0.1:{port}"
        assert f"gateway-2 127.0.0.1:{port + 1}" in text and "2 gateway replicas share the database" in text
        assert f"ipv4:127.0.0.1:{port},127.0.0.1:{port + 1}" in text
        out = tmp_path / "g.mp4"
        g = subprocess.run(_cli("generate", "a green ball moves left", "--out", str(out), "--steps", "2", "--size",
                                "128x128", "--fps", "8", "-q", "--gateway", f"127.0.0.1:{port}"), env=env,
                           capture_output=True, text=True, timeout=180)  # fmt: skip
        assert g.returncode == 0, g.stderr
        vid = g.stdout.splitlines()[0].split()[1]
        again = tmp_path / "again.mp4"
        w = subprocess.run(_cli("watch", vid, "--out", str(again), "-q", "--gateway", f"127.0.0.1:{port + 1}"),
                           env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert w.returncode == 0, w.stderr
        assert again.read_bytes() == out.read_bytes()
        # one round_robin client over both replicas: every call lands, whichever gateway takes it
        from videomesh.client import VideoClient

        key = (tmp_path / "data" / "dev-api-key").read_text().strip()
        with VideoClient(f"ipv4:127.0.0.1:{port},127.0.0.1:{port + 1}", key) as c:
            assert all(c.get(vid).id == vid for _ in range(6))
    finally:
        up.send_signal(signal.SIGTERM)
        rc = up.wait(timeout=30)
    assert rc == 0
    bad = subprocess.run(_cli("up", "--replicas", "2", "--data-dir", str(tmp_path / "x")), env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "--database postgresql://" in bad.stderr


def test_up_with_tls_self_signed_serves_tls_clients_on_this_machine_and_refuses_plaintext(tmp_path):
    """`videomesh up --tls-self-signed`: the gateway port speaks TLS only; the CLI finds the address and its
    CA that `up` saved, `--ca` works from anywhere, plaintext is refused, and stop removes the saved CA."""
    env = _env(tmp_path)
    up, address, lines = _start_up(tmp_path, "--tls-self-signed", env=env)
    cert = tmp_path / "data" / "tls" / "cert.pem"
    saved_ca = Path(env["VIDEOMESH_HOME"]) / "gateway-ca.pem"
    try:
        text = "".join(lines)
        assert "TLS on the gateway port, self-signed" in text and str(cert) in text
        assert saved_ca.read_bytes() == cert.read_bytes()
        h = subprocess.run(
            _cli("health"), env=env, capture_output=True, text=True, timeout=60
        )  # saved address + CA
        assert h.returncode == 0 and h.stdout.count(" SERVING") == 5, h.stdout + h.stderr
        out = tmp_path / "t.mp4"
        g = subprocess.run(_cli("generate", "a red ball moves right", "--out", str(out), "--steps", "2", "--size",
                                "128x128", "--fps", "8", "-q", "--gateway", address, "--ca", str(cert)), env=env,
                           capture_output=True, text=True, timeout=180)  # fmt: skip
        assert g.returncode == 0 and out.stat().st_size > 0, g.stderr
        plain = subprocess.run(_cli("health", "--gateway", address, "--timeout", "2"), env=env, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert plain.returncode != 0  # an explicit address without --ca: plaintext, refused at the handshake
        secret = (tmp_path / "data" / "mesh-secret").stat()
        assert oct(secret.st_mode & 0o777) == "0o600"
    finally:
        up.send_signal(signal.SIGTERM)
        rc = up.wait(timeout=60)
    assert rc == 0
    assert not saved_ca.exists()  # stop removed it with the saved address
