"""`videomesh up` as a supervisor, with real service processes: a service that dies comes back
on its address (a `generate` in flight re-attaches and finishes), and `up` gives up, stops
everything and exits non-zero when one keeps dying."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from gateway.media import probe
from tests.helpers import health_status
from tests.integration.test_cli import _cli, _env, _start_up
from videomesh.client import VideoClient
from videomesh.mesh import SERVICE_NAMES
from videomesh.v1 import common_pb2

pytestmark = pytest.mark.slow


class Output:
    """Collects a process's output lines in the background; wait() for one matching a pattern."""

    def __init__(self, proc, lines):
        self.lines = list(lines)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                assert left > 0, f"no line matching {pattern!r} in:\n{''.join(self.lines)}"
                self._cond.wait(min(left, 1.0))

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)


def _services(lines) -> dict[str, tuple[str, int]]:
    out = {}
    for line in lines:
        if m := re.match(r"  (\w+)\s+(\S+) \(pid (\d+)\)", line):
            out[m[1]] = (m[2], int(m[3]))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_healthy(env, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        h = subprocess.run(_cli("health"), env=env, capture_output=True, text=True, timeout=60)
        if h.returncode == 0 or time.monotonic() > deadline:
            return h
        time.sleep(1)


@pytest.mark.timeout(600)  # one mesh for three scenarios: ~4 min on 2 busy cores
def test_up_restarts_dead_services_on_their_address_and_gives_up_when_one_keeps_dying(tmp_path, monkeypatch):
    env = _env(tmp_path)
    up, address, lines = _start_up(tmp_path, "--max-restarts", "2", env=env)
    out = Output(up, lines)
    services = _services(lines)
    assert set(services) == {"encoder", "denoiser", "upscaler", "qc", "gateway"}, lines
    pids = {n: pid for n, (_, pid) in services.items()}
    gen = None
    try:
        # 1. the gateway dies under a running job: up starts it again on the same port; generate re-attaches
        gen = subprocess.Popen(_cli("generate", "a red ball moving right on a black background", "--steps", "3",
                                    "--size", "128x128", "--fps", "8", "-q", "--out", str(tmp_path / "clip.mp4")),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        first = gen.stdout.readline().split()
        assert first[:1] == ["video"] and first[2] == "queued", first
        vid = first[1]
        monkeypatch.setenv("VIDEOMESH_HOME", env["VIDEOMESH_HOME"])
        with VideoClient(address) as c:
            deadline = time.monotonic() + 120
            while c.get(vid).status != common_pb2.RUNNING:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        os.kill(pids["gateway"], signal.SIGKILL)
        out.wait(rf"gateway was killed by SIGKILL; restarting it in 1 s on {re.escape(address)}")
        out.wait(r"gateway: started again \(pid \d+\)")
        out.wait(rf"gateway: SERVING again on {re.escape(address)}", timeout=180)
        g_out, g_err = gen.communicate(timeout=300)
        assert gen.returncode == 0, g_err
        assert f"re-attaching to {vid} after event" in g_err
        assert probe(tmp_path / "clip.mp4")["frames"] == 32

        # 2. SIGTERM to qc: it comes back on its address and SERVING; the mesh stays up
        qc_address = services["qc"][0]
        os.kill(pids["qc"], signal.SIGTERM)
        out.wait(r"qc exited with code 0; restarting it in 1 s")
        qc_pid = int(out.wait(r"qc: started again \(pid (\d+)\)")[1])
        out.wait(rf"qc: SERVING again on {re.escape(qc_address)}", timeout=120)
        assert health_status(qc_address, SERVICE_NAMES["qc"]) == 1
        h = _wait_healthy(env)
        assert h.returncode == 0 and h.stdout.count("SERVING") == 5, h.stdout + h.stderr
        assert up.poll() is None

        # 3. qc keeps dying (its port is taken): after 2 restarts up gives up, stops all and exits non-zero
        host, port = qc_address.rsplit(":", 1)
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        os.kill(qc_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                blocker.bind((host, int(port)))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        blocker.listen()
        try:
            rc = up.wait(timeout=180)
        finally:
            blocker.close()
        assert rc == 1, out.text()
        out.wait(
            r"qc exited with code \d+; it was restarted 2 time\(s\) in the last 300 s \(limit 2\): giving up"
        )
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
    time.sleep(0.5)
    restarted = [int(m) for m in re.findall(r"started again \(pid (\d+)\)", out.text())]
    assert not [p for p in [*pids.values(), *restarted] if _alive(p)]  # every service process is gone
    assert (
        not (tmp_path / "home" / "gateway").exists() and not (tmp_path / "data" / "gateway-address").exists()
    )
