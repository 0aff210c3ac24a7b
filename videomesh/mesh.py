"""Run the whole mesh locally: one process per service on loopback, free ports.

Used by `videomesh up` and `videomesh demo` (and the end-to-end tests). Each service is a
real `python -m videomesh.launch NAME` process; the gateway learns the others' addresses.

With `replicas=N` and a PostgreSQL `database`, N gateway processes (gateway, gateway-2, …) share the
database and the data dir's storage (one machine: shared by construction) in front of one set of
downstream services; any of them serves any job.

`supervise()` (what `videomesh up` runs) restarts a service that exits, on the same
address so the gateway's channels (and clients) reconnect, with an exponential back-off;
it gives up, and says so, when one service needs more than `max_restarts` restarts within
`restart_window` seconds.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.jobs import is_postgres
from gateway.tenants import open_tenants
from videomesh import probe
from videomesh.client import (
    GATEWAY_ADDRESS_FILE,
    channel,
    dev_key_file,
    gateway_file,
    remove_address_file,
    write_address_file,
)
from videomesh.errors import Unauthenticated
from videomesh.meshauth import ENV as SECRET_ENV
from videomesh.meshauth import FILE_ENV
from videomesh.probe import SERVICE_NAMES

DOWNSTREAMS = ("encoder", "denoiser", "upscaler", "qc")
DEV_TENANT = "dev"


class Interrupted(RuntimeError):
    """start() was asked to stop (the user's signal) before the mesh was up."""


def wait_serving(address: str, service: str, timeout: float, proc: subprocess.Popen | None = None,
                 cancel: threading.Event | None = None, root_certificates: bytes | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    with channel(address, root_certificates=root_certificates) as ch:  # health needs no mesh credential
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode} during start-up")
            if cancel is not None and cancel.is_set():
                raise Interrupted("interrupted during start-up")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} at {address} not SERVING after {timeout:.0f}s")
            time.sleep(0.2)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _service(name: str) -> str:
    """The service a process of the mesh runs: gateway-2, gateway-3, … are gateways too."""
    return "gateway" if name.startswith("gateway") else name


class LocalMesh:
    def __init__(self, data_dir: Path, *, port: int = 0, env: dict | None = None, log_dir: Path | None = None,
                 extra_args: dict[str, list[str]] | None = None, max_restarts: int = 5,
                 restart_window: float = 300.0, backoff: float = 1.0, max_backoff: float = 30.0,
                 replicas: int = 1, database: str = "", tls_self_signed: bool = False):  # fmt: skip
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self.log_dir = Path(log_dir) if log_dir else self.data_dir / "logs"
        self.extra_args = extra_args or {}
        self.api_key = ""
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stopping = threading.Event()  # set -> start() gives up at its next check
        self._args: dict[str, list[str]] = {}
        self._run_dir: Path | None = None
        self._published: list[Path] = []
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        if replicas > 1 and not is_postgres(database):
            raise ValueError("several gateway replicas need a shared PostgreSQL database (postgresql://…)")
        self.replicas = replicas
        self.database = database
        self.tls_self_signed = tls_self_signed
        # the gateways' certificate (--tls-self-signed): also the clients' CA
        self.tls_cert: Path | None = None
        self.root_certificates: bytes | None = None
        # The mesh credential every internal call carries (videomesh.meshauth): the operator's, or one made
        # for this data dir (kept there, 0600, so a restarted service and its gateway still agree)
        if not (self.env.get(FILE_ENV) or self.env.get(SECRET_ENV)):
            secret_file = self.data_dir / "mesh-secret"
            if not secret_file.exists():
                self.data_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
            self.env[FILE_ENV] = str(secret_file)
        # the gateways' names: gateway, gateway-2, gateway-3, …
        self.gateways = ["gateway"] + [f"gateway-{i}" for i in range(2, replicas + 1)]

    def _spawn(self, name: str, args: list[str], tmp: Path) -> Path:
        service = _service(name)
        port_file = tmp / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = self.env
        if (
            service == "gateway" and self.database
        ):  # in the environment, not argv: the URL may hold a password
            env = {**env, "VIDEOMESH_GATEWAY_DATABASE": self.database}
            if is_postgres(self.database):
                env.setdefault("VIDEOMESH_GATEWAY_SHARED_STORAGE", "true")  # every replica reads data_dir
        if service == "gateway" and self.tls_cert is not None:
            env = {**env, "VIDEOMESH_GATEWAY_TLS_CERT": str(self.tls_cert),
                   "VIDEOMESH_GATEWAY_TLS_KEY": str(self.tls_cert.with_name("key.pem"))}  # fmt: skip
        with open(self.log_dir / f"{name}.log", "ab") as log:
            cmd = [sys.executable, "-m", "videomesh.launch", service, "--port-file", str(port_file), *args,
                   *self.extra_args.get(service, [])]  # fmt: skip
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return port_file

    def _port(self, name: str, port_file: Path, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.procs[name].poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {self.procs[name].returncode}; see {self.log_file(name)}"
                )
            if self.stopping.is_set():
                raise Interrupted("interrupted during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not bind a port in {timeout:.0f}s")
            time.sleep(0.05)
        return f"127.0.0.1:{port_file.read_text().strip()}"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, timeout: float = 180.0) -> str:
        """Start everything; return the gateway address once every service is SERVING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tenants = open_tenants(self.data_dir, self.database)
        key_file = self.data_dir / "dev-api-key"
        key = key_file.read_text().strip() if key_file.exists() else ""
        try:
            tenants.authenticate(key)
        except Unauthenticated:
            key = tenants.add(DEV_TENANT, "pro")
        finally:
            tenants.close()
        self.api_key = key
        key_file.write_text(key)
        key_file.chmod(0o600)
        home_key = dev_key_file()
        home_key.parent.mkdir(parents=True, exist_ok=True)
        home_key.write_text(self.api_key)
        home_key.chmod(0o600)
        if self.tls_self_signed and self.tls_cert is None:
            from videomesh.tls import self_signed

            self.tls_cert, _ = self_signed(self.data_dir / "tls")
            self.root_certificates = self.tls_cert.read_bytes()
        self._run_dir = Path(tempfile.mkdtemp(prefix="videomesh-ports-"))
        tmp = self._run_dir
        try:
            for n in DOWNSTREAMS:
                self._args[n] = []
            files = {n: self._spawn(n, self._args[n], tmp) for n in DOWNSTREAMS}
            for n in DOWNSTREAMS:
                self.addresses[n] = self._port(n, files[n], timeout)
            gw_args = ["--data-dir", str(self.data_dir)]
            for n in DOWNSTREAMS:
                gw_args += [f"--{n}", self.addresses[n]]
            files = {}
            for i, g in enumerate(self.gateways):  # ports P … P+N-1 (free ports when P is 0)
                self._args[g] = gw_args
                files[g] = self._spawn(g, [*gw_args, "--port", str(self.port + i if self.port else 0)], tmp)
            for g in self.gateways:
                self.addresses[g] = self._port(g, files[g], timeout)
            # ready = each gateway SERVING and its mirror of every downstream SERVING too
            for g in self.gateways:
                for n in (*DOWNSTREAMS, "gateway"):
                    wait_serving(self.addresses[g], SERVICE_NAMES[n], timeout, self.procs[g], self.stopping,
                                 root_certificates=self.root_certificates)  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self.addresses["gateway"]

    # --- where other commands find the gateway ---------------------------------------------------
    def publish_address(self) -> list[Path]:
        """Save the gateway address in ~/.videomesh/gateway and DATA_DIR/gateway-address
        (removed again by stop())."""
        self._published = [gateway_file(), self.data_dir / GATEWAY_ADDRESS_FILE]
        for f in self._published:
            write_address_file(f, self.addresses["gateway"])
        from videomesh.tls import ca_file

        if self.tls_cert is not None:  # the saved address comes with the CA to verify it against
            ca_file().write_bytes(self.root_certificates)
            self._published.append(ca_file())
        else:
            ca_file().unlink(missing_ok=True)  # a CA left by an earlier TLS mesh must not apply to this one
        return list(self._published)

    def _unpublish(self) -> None:
        for f in self._published:
            try:
                if f.suffix == ".pem":
                    f.unlink(missing_ok=True)
                else:
                    remove_address_file(f, self.addresses.get("gateway", ""))
            except OSError:
                pass
        self._published = []

    # --- supervision -----------------------------------------------------------------------------
    def restart(self, name: str) -> subprocess.Popen:
        """Start `name` again on the address it had, so its clients' channels reconnect."""
        port = self.addresses[name].rsplit(":", 1)[1]
        assert self._run_dir is not None, "start() first"
        self._spawn(name, [*self._args[name], "--port", port], self._run_dir)
        return self.procs[name]

    def _serving(self, name: str) -> bool:
        service = _service(name)
        roots = self.root_certificates if service == "gateway" else None
        return probe.serving(self.addresses[name], SERVICE_NAMES[service], timeout=0.5, ca=roots)

    def supervise(self, stop: threading.Event, log: Callable[[str], None] = print, poll: float = 0.5) -> int:
        """Keep every service running until `stop` is set (-> 0). A service that exits is
        restarted on its address after 1, 2, 4, … s (at most `max_backoff`); when one needs
        more than `max_restarts` restarts within `restart_window` s, give up (-> 1; the caller
        stops the rest)."""
        restarts: dict[str, list[float]] = {n: [] for n in self.procs}
        due: dict[str, float] = {}  # name -> when to start it again
        starting: set[str] = set()  # restarted, not yet SERVING
        while not stop.wait(poll):
            now = time.monotonic()
            for name, proc in list(self.procs.items()):
                if name in due:
                    if now >= due[name]:
                        del due[name]
                        p = self.restart(name)
                        starting.add(name)
                        log(f"{name}: started again (pid {p.pid}) on {self.addresses[name]}")
                    continue
                if proc.poll() is None:
                    if name in starting and self._serving(name):
                        starting.discard(name)
                        log(f"{name}: SERVING again on {self.addresses[name]}")
                    continue
                starting.discard(name)
                recent = [t for t in restarts[name] if now - t < self.restart_window]
                how = describe_exit(proc.returncode)
                if len(recent) >= self.max_restarts:
                    log(f"{name} {how}; it was restarted {len(recent)} time(s) in the last "
                        f"{self.restart_window:g} s (limit {self.max_restarts}): giving up, stopping the mesh "
                        f"(see {self.log_file(name)})")  # fmt: skip
                    return 1
                delay = min(self.max_backoff, self.backoff * 2 ** len(recent))
                recent.append(now)
                restarts[name] = recent
                due[name] = now + delay
                log(f"{name} {how}; restarting it in {delay:g} s on {self.addresses[name]} "
                    f"(restart {len(recent)} of at most {self.max_restarts} within {self.restart_window:g} s; "
                    f"see {self.log_file(name)})")  # fmt: skip
        return 0

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the gateways and wait for their drain (their jobs in flight still need the downstreams),
        then the downstreams; SIGKILL what is left of either after `grace` (more than a service's own drain,
        VIDEOMESH_GRACE_SECONDS, default 10)."""
        self.stopping.set()
        self._unpublish()
        for group in (self.gateways, DOWNSTREAMS):
            for n in group:
                p = self.procs.get(n)
                if p and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for n in group:
                p = self.procs.get(n)
                if not p:
                    continue
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
