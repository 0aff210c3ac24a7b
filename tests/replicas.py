"""Several gateway processes on one PostgreSQL database and one S3 bucket, in front of one set of
downstream services (the tiny model, in this process): what `videomesh up --replicas N` runs, with
the knobs the tests need (lease length, tiers, workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.tenants import open_tenants
from tests.helpers import start_downstreams
from tests.s3server import ACCESS_KEY, SECRET_KEY
from videomesh.mesh import SERVICE_NAMES, wait_serving


class Replicas:
    def __init__(self, root: Path, database: str, s3_endpoint: str, *, gateway_env: dict | None = None,
                 gateway_toml: str = "", bucket: str = "videomesh"):  # fmt: skip
        """`gateway_toml`: the body of a [gateway] table (tiers and other tables the environment cannot
        carry), given to every replica through VIDEOMESH_CONFIG."""
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.database = database
        self.procs: list[subprocess.Popen | None] = []
        self.addresses: list[str] = []
        self.servers, self._stops = start_downstreams()
        self.tenants = open_tenants(self.data_dir, database)
        self.env = {
            **os.environ,
            "VIDEOMESH_GATEWAY_DATABASE": database,
            "VIDEOMESH_GATEWAY_STORAGE": "s3",
            "VIDEOMESH_GATEWAY_S3_ENDPOINT": s3_endpoint,
            "VIDEOMESH_GATEWAY_S3_ACCESS_KEY": ACCESS_KEY,
            "VIDEOMESH_GATEWAY_S3_SECRET_KEY": SECRET_KEY,
            "VIDEOMESH_GATEWAY_S3_BUCKET": bucket,
            "VIDEOMESH_GATEWAY_SIZES": "64x64,32x32",
            "VIDEOMESH_GATEWAY_DEFAULT_SIZE": "64x64",
            "VIDEOMESH_GATEWAY_FPS_CHOICES": "8,12",
            "VIDEOMESH_GATEWAY_DEFAULT_FPS": "8",
            "VIDEOMESH_GATEWAY_LEASE_SECONDS": "5",  # short, but safe from a loaded machine's scheduling
            "VIDEOMESH_GATEWAY_DATABASE_POOL": "8",
            **(gateway_env or {}),
        }
        self.env.pop("VIDEOMESH_CONFIG", None)
        if gateway_toml:
            cfg = self.root / "gateway.toml"
            cfg.write_text(gateway_toml)
            self.env["VIDEOMESH_CONFIG"] = str(cfg)

    def start(self, n: int = 1, timeout: float = 60.0) -> list[str]:
        """Start n more gateway replicas; their addresses once each is SERVING."""
        started = []
        for _ in range(n):
            i = len(self.procs)
            port_file = Path(tempfile.mkdtemp(prefix="vmgw-")) / "port"
            args = [sys.executable, "-m", "videomesh.launch", "gateway", "--port-file", str(port_file),
                    "--data-dir", str(self.data_dir)]  # fmt: skip
            for d in ("encoder", "denoiser", "upscaler", "qc"):
                args += [f"--{d}", self.servers[d].address]
            log = open(self.root / f"gateway-{i}.log", "ab")
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))  # fmt: skip
            deadline = time.monotonic() + timeout
            while not port_file.exists():
                if self.procs[i].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway {i} did not start: {self.log(i)[-3000:]}")
                time.sleep(0.05)
            self.addresses.append(f"127.0.0.1:{port_file.read_text().strip()}")
            started.append(i)
        for i in started:
            wait_serving(self.addresses[i], SERVICE_NAMES["gateway"], timeout, self.procs[i])
        return [self.addresses[i] for i in started]

    def log(self, i: int) -> str:
        return (self.root / f"gateway-{i}.log").read_text(errors="replace")

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.procs[i].send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.procs[i].wait(30)

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in self._stops:
            s()
        self.tenants.close()
