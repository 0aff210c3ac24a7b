"""Tenants and API keys. Keys are random, shown once, and stored only as SHA-256 hashes: in a JSON file
(one gateway) or in the gateway's PostgreSQL database (gateway/pg_tenants.py, shared by the replicas)."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.jobs import is_postgres
from videomesh.errors import InvalidArgument, NotFound, Unauthenticated

KEY_PREFIX = "vm_"


@dataclass(frozen=True)
class Tenant:
    name: str
    tier: str = "free"
    webhook_url: str = ""
    webhook_secret: str = ""  # signs webhook bodies (HMAC-SHA256); shown by `tenants add`


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantDirectory:
    """File-backed (JSON, written atomically) or in-memory when path is None."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {}
        self._keys: dict[str, dict] = {}  # hash -> {"tenant": name, "revoked": bool, "id": short id}
        self._mtime = 0.0
        self.reload()

    def _save(self) -> None:
        if not self.path:
            return
        # another process (`videomesh tenants add`) may have written since we read: merge by re-reading first
        if self.path.exists() and self.path.stat().st_mtime != self._mtime:
            data = json.loads(self.path.read_text())
            for t in data.get("tenants", []):
                self._tenants.setdefault(t["name"], Tenant(**t))
            for h, k in data.get("keys", {}).items():
                mine = self._keys.setdefault(h, k)
                # a revocation or a rotation's deadline written by another process is never undone here
                mine["revoked"] = bool(mine.get("revoked")) or bool(k.get("revoked"))
                ends = [e for e in (mine.get("expires"), k.get("expires")) if e]
                if ends:
                    mine["expires"] = min(ends)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"tenants": [asdict(t) for t in self._tenants.values()], "keys": self._keys}, indent=1)
        )
        tmp.chmod(0o600)
        tmp.replace(self.path)
        self._mtime = self.path.stat().st_mtime

    def close(self) -> None:
        """Nothing held open (the database directory closes its pool)."""

    def reload(self) -> None:
        """Re-read the file if another process changed it (keys added or revoked by the CLI)."""
        if not self.path or not self.path.exists():
            return
        mtime = self.path.stat().st_mtime
        if mtime == self._mtime:
            return
        with self._lock:
            data = json.loads(self.path.read_text())
            self._tenants = {t["name"]: Tenant(**t) for t in data.get("tenants", [])}
            self._keys = data.get("keys", {})
            self._mtime = mtime

    def add(self, name: str, tier: str = "free", webhook_url: str = "", *,
            tiers: Collection[str] | None = None) -> str:  # fmt: skip
        """Create (or update the tier of) a tenant and issue a new key; returns the key.
        With `tiers`, a tier not among them is refused (InvalidArgument naming them)."""
        check_new(name, tier, tiers)
        with self._lock:
            old = self._tenants.get(name)
            secret = old.webhook_secret if old else new_webhook_secret()
            self._tenants[name] = Tenant(name, tier, webhook_url or (old.webhook_url if old else ""), secret)
            key = new_key()
            self._keys[key_hash(key)] = {"tenant": name, "revoked": False, "id": key_hash(key)[:8]}
            self._save()
            return key

    def list(self) -> list[tuple[Tenant, list[dict]]]:
        with self._lock:
            return [
                (t, [k for k in self._keys.values() if k["tenant"] == t.name]) for t in self._tenants.values()
            ]

    def revoke(self, name: str) -> int:
        """Revoke every key of a tenant; returns how many."""
        with self._lock:
            if name not in self._tenants:
                raise NotFound(f"tenant {name!r} not found")
            n = 0
            for k in self._keys.values():
                if k["tenant"] == name and not k["revoked"]:
                    k["revoked"] = True
                    n += 1
            self._save()
            return n

    def rotate(self, name: str, grace: float = 0.0) -> str:
        """Issue a fresh key; the tenant's other keys stop working after `grace` seconds (0: now), so
        its services can move to the new key without an outage."""
        if name not in self._tenants:
            raise NotFound(f"tenant {name!r} not found")
        check_grace(grace)
        if grace == 0:
            self.revoke(name)
            return self.add(name, self._tenants[name].tier)
        until = time.time() + grace
        with self._lock:
            for k in self._keys.values():
                if k["tenant"] == name and not k["revoked"]:
                    k["expires"] = min(k.get("expires") or until, until)
            self._save()
        return self.add(name, self._tenants[name].tier)

    def find(self, name: str) -> Tenant | None:
        """The tenant, or None."""
        with self._lock:
            return self._tenants.get(name)

    def active_keys(self, name: str) -> int:
        with self._lock:
            return sum(k["tenant"] == name and key_active(k) for k in self._keys.values())

    def get(self, name: str) -> Tenant:
        with self._lock:
            if name not in self._tenants:
                raise NotFound(f"tenant {name!r} not found")
            return self._tenants[name]

    def authenticate(self, key: str | None) -> Tenant:
        if not key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
        self.reload()
        with self._lock:
            rec = self._keys.get(key_hash(key))
            if rec is None or rec["revoked"] or (rec.get("expires") and rec["expires"] <= time.time()):
                raise Unauthenticated("invalid or revoked API key")
            return self._tenants[rec["tenant"]]


def check_new(name: str, tier: str, tiers: Collection[str] | None) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidArgument(
            f"tenant name must be letters, digits, '-', '_' or '.'; got {name!r}", field="name"
        )
    if tiers is not None and tier not in tiers:
        raise InvalidArgument(f"unknown tier {tier!r}; choose one of {', '.join(tiers)}", field="tier")


def check_grace(grace: float) -> None:
    if grace < 0 or grace != grace:
        raise InvalidArgument(f"grace must be 0 or more seconds; got {grace}", field="grace")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(24)


def open_tenants(data_dir: Path, database: str = "", *, import_file: bool = True, timeout: float = 5.0):
    """The tenant directory of a gateway: in its PostgreSQL database when it has one (every replica
    sees every key at once; `data_dir/tenants.json`, if any and `import_file`, is imported once into
    empty tables), else the JSON file `data_dir/tenants.json`."""
    if is_postgres(database):
        from gateway.pg_tenants import PostgresTenantDirectory

        source = Path(data_dir) / "tenants.json" if import_file else None
        return PostgresTenantDirectory(database, import_from=source, timeout=timeout)
    return TenantDirectory(Path(data_dir) / "tenants.json")


def key_active(k: dict) -> bool:
    """Neither revoked nor past the end of its rotation grace."""
    return not k["revoked"] and not (k.get("expires") and k["expires"] <= time.time())


def key_from_metadata(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization":
            return v[7:].strip() if v.lower().startswith("bearer ") else v.strip()
        if k == "x-api-key":
            return v.strip()
    return None
