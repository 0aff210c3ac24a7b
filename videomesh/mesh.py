"""Run the whole mesh locally: one process per service on loopback, free ports.

Used by `videomesh up` and `videomesh demo` (and the end-to-end tests). Each service is a
real `python -m videomesh.launch NAME` process; the gateway learns the others' addresses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.tenants import TenantDirectory
from videomesh.client import DEV_KEY_FILE
from videomesh.errors import Unauthenticated

DOWNSTREAMS = ("encoder", "denoiser", "upscaler", "qc")
SERVICE_NAMES = {
    "encoder": "videomesh.v1.TextEncoder",
    "denoiser": "videomesh.v1.Denoiser",
    "upscaler": "videomesh.v1.Upscaler",
    "qc": "videomesh.v1.QualityCheck",
    "gateway": "videomesh.v1.VideoService",
}
DEV_TENANT = "dev"


def wait_serving(address: str, service: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode} during start-up")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} at {address} not SERVING after {timeout:.0f}s")
            time.sleep(0.2)


class LocalMesh:
    def __init__(self, data_dir: Path, *, port: int = 0, env: dict | None = None, log_dir: Path | None = None,
                 extra_args: dict[str, list[str]] | None = None):  # fmt: skip
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self.log_dir = Path(log_dir) if log_dir else self.data_dir / "logs"
        self.extra_args = extra_args or {}
        self.api_key = ""

    def _spawn(self, name: str, args: list[str], tmp: Path) -> Path:
        port_file = tmp / f"{name}.port"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", "videomesh.launch", name, "--port-file", str(port_file), *args,
               *self.extra_args.get(name, [])]  # fmt: skip
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        return port_file

    def _port(self, name: str, port_file: Path, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.procs[name].poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {self.procs[name].returncode}; see {self.log_dir / (name + '.log')}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not bind a port in {timeout:.0f}s")
            time.sleep(0.05)
        return f"127.0.0.1:{port_file.read_text().strip()}"

    def start(self, timeout: float = 180.0) -> str:
        """Start everything; return the gateway address once every service is SERVING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tenants = TenantDirectory(self.data_dir / "tenants.json")
        key_file = self.data_dir / "dev-api-key"
        key = key_file.read_text().strip() if key_file.exists() else ""
        try:
            tenants.authenticate(key)
        except Unauthenticated:
            key = tenants.add(DEV_TENANT, "pro")
        self.api_key = key
        key_file.write_text(key)
        key_file.chmod(0o600)
        DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        DEV_KEY_FILE.write_text(self.api_key)
        DEV_KEY_FILE.chmod(0o600)
        with tempfile.TemporaryDirectory(prefix="videomesh-ports-") as d:
            tmp = Path(d)
            try:
                files = {n: self._spawn(n, [], tmp) for n in DOWNSTREAMS}
                for n in DOWNSTREAMS:
                    self.addresses[n] = self._port(n, files[n], timeout)
                gw_args = ["--data-dir", str(self.data_dir), "--port", str(self.port)]
                for n in DOWNSTREAMS:
                    gw_args += [f"--{n}", self.addresses[n]]
                self.addresses["gateway"] = self._port(
                    "gateway", self._spawn("gateway", gw_args, tmp), timeout
                )
                # ready = the gateway SERVING and its mirror of every downstream SERVING too
                for n in (*DOWNSTREAMS, "gateway"):
                    wait_serving(self.addresses["gateway"], SERVICE_NAMES[n], timeout, self.procs["gateway"])
            except BaseException:
                self.stop()
                raise
        return self.addresses["gateway"]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM everything (each drains), then SIGKILL what is left after `grace`."""
        order = ["gateway", *DOWNSTREAMS]
        for n in order:
            p = self.procs.get(n)
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for n in order:
            p = self.procs.get(n)
            if not p:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
