"""A real PostgreSQL 16 for the tests, from the `pgserver` wheel (no system package, no network).

One server per test session (it starts in under a second); each test gets a database of its own
(`PgServer.database()`), so tests never see each other's jobs. `restart()` stops the server for a
while and starts it again on the same socket, for the outage tests.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import psycopg


class PgServer:
    _names = itertools.count()

    def __init__(self, root: Path | None = None):
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="vmrun-"))  # pgserver's lock file
        import pgserver

        # a short path: the server's Unix socket lives in it (socket paths are limited to ~100 bytes)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="vmpg-"))
        self.pgdata = self.root / "pgdata"
        self.server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self.url = self.server.get_uri()

    def database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.server.get_uri(database=name)

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=30)

    def stop_server(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start_server(self) -> None:
        """Start again as pgserver does: no TCP, the Unix socket in the same directory as before."""
        socket_dir = self.url.rsplit("host=", 1)[1]
        self._pg_ctl("-w", "-o", f"-h '' -k {socket_dir}", "-l", str(self.pgdata / "log"), "start")

    def restart(self, down_seconds: float = 2.0) -> None:
        """An outage: stop (fast: sessions are cut), stay down `down_seconds`, start again."""
        self.stop_server()
        time.sleep(down_seconds)
        self.start_server()

    def close(self) -> None:
        import atexit

        try:
            self.server.cleanup()
        finally:
            # pgserver also registered its cleanup to run at exit, when pytest has closed the streams its
            # logger writes to ("Logging error" noise): it is done already
            atexit.unregister(self.server._cleanup)
            shutil.rmtree(self.root, ignore_errors=True)
