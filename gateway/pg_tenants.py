"""Tenants and API keys in the gateway's PostgreSQL database (tables `tenants` and `api_keys`, migration 4
of gateway/pg_store.py): what every replica reads, so a key added, revoked or rotated on any replica or by
`videomesh tenants --database URL` holds on all of them at the next call, and the replicas need no shared
volume for a keys file. Same interface and rules as gateway.tenants.TenantDirectory (hashes only, a
rotation's grace, a revocation never undone); a database that cannot answer is UNAVAILABLE with a retry
delay, never a refusal of a good key."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from gateway.pg_store import _unavailable, migrate
from gateway.tenants import (
    Tenant,
    check_grace,
    check_new,
    key_hash,
    new_key,
    new_webhook_secret,
)
from videomesh.errors import NotFound, Unauthenticated

log = logging.getLogger("videomesh.gateway.tenants")

_ACTIVE = "NOT k.revoked AND (k.expires IS NULL OR k.expires > %s)"
SCHEMA = 4  # the migration that made the tables: what this module needs, and all it applies


class PostgresTenantDirectory:
    def __init__(
        self, url: str, *, import_from: Path | None = None, timeout: float = 5.0, pool_size: int = 4
    ):
        """`import_from`: a gateway's tenants.json, imported if the tables are empty (the gateway passes its
        own; the CLI none). Migrates the schema up to the tenants' tables only: a CLI newer than the running
        gateways never moves their database past what they know."""
        with psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout))) as conn:
            migrate(conn, upto=SCHEMA)
        self.pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout, open=True,
                                   kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))},
                                   check=ConnectionPool.check_connection, name="videomesh-tenants")  # fmt: skip
        if import_from is not None and Path(import_from).exists():
            self.import_file(Path(import_from), only_if_empty=True)

    def close(self) -> None:
        self.pool.close()

    def reload(self) -> None:
        """Nothing to re-read: every call asks the database."""

    @_unavailable
    def import_file(self, path: Path, *, only_if_empty: bool = False) -> tuple[int, int]:
        """Bring a JSON keys file (a single gateway's, or the replicas' shared one from before) into the
        tables: the tenants not there yet are added with their key hashes; a tenant already there is left
        exactly as it is (no key of the file's revives one revoked or rotated in the database). `only_if_empty`: only into empty tables (a gateway's first start on
        PostgreSQL; after that the file is not read). -> (tenants, keys) added."""
        data = json.loads(Path(path).read_text())
        added_tenants = added_keys = 0
        with self.pool.connection() as conn:
            if only_if_empty and conn.execute("SELECT 1 FROM tenants LIMIT 1").fetchone():
                log.debug("the database has tenants: %s is not imported", path)
                return 0, 0
            with conn.transaction():
                conn.execute("LOCK TABLE tenants IN EXCLUSIVE MODE")  # replicas starting at once: one imports
                if only_if_empty and conn.execute("SELECT 1 FROM tenants LIMIT 1").fetchone():
                    return 0, 0
                added: set[str] = set()  # keys come only with a tenant the import adds: one the database
                for t in data.get("tenants", []):  # has (perhaps revoked there) keeps exactly its keys
                    if conn.execute(
                        "INSERT INTO tenants (name, tier, webhook_url, webhook_secret) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (name) DO NOTHING",
                        (t["name"], t.get("tier", "free"), t.get("webhook_url", ""),
                         t.get("webhook_secret") or new_webhook_secret()),
                    ).rowcount:  # fmt: skip
                        added.add(t["name"])
                for h, k in data.get("keys", {}).items():
                    if k.get("tenant") in added:
                        added_keys += conn.execute(
                            "INSERT INTO api_keys (hash, tenant, id, revoked, expires) VALUES (%s, %s, %s, %s, %s) "
                            "ON CONFLICT (hash) DO NOTHING",
                            (h, k["tenant"], k.get("id", h[:8]), bool(k.get("revoked")), k.get("expires")),
                        ).rowcount  # fmt: skip
                added_tenants = len(added)
        if added_tenants or added_keys:
            log.warning("imported %d tenant(s) and %d key(s) from %s into the database%s", added_tenants, added_keys,
                        path, "; the file is not read again" if only_if_empty else "")  # fmt: skip
        return added_tenants, added_keys

    @_unavailable
    def add(self, name: str, tier: str = "free", webhook_url: str = "", *,
            tiers: Collection[str] | None = None) -> str:  # fmt: skip
        """Create (or update the tier of) a tenant and issue a new key; returns the key."""
        check_new(name, tier, tiers)
        with self.pool.connection() as conn, conn.transaction():
            return self._add(conn, name, tier, webhook_url)

    @staticmethod
    def _add(conn, name: str, tier: str, webhook_url: str = "") -> str:
        key = new_key()
        # the webhook secret of an existing tenant is kept; its URL is kept unless a new one is given
        conn.execute(
            """INSERT INTO tenants (name, tier, webhook_url, webhook_secret) VALUES (%s, %s, %s, %s)
               ON CONFLICT (name) DO UPDATE SET tier = EXCLUDED.tier,
                 webhook_url = CASE WHEN EXCLUDED.webhook_url <> '' THEN EXCLUDED.webhook_url
                                    ELSE tenants.webhook_url END""",
            (name, tier, webhook_url, new_webhook_secret()),
        )
        conn.execute("INSERT INTO api_keys (hash, tenant, id) VALUES (%s, %s, %s)",
                     (key_hash(key), name, key_hash(key)[:8]))  # fmt: skip
        return key

    @_unavailable
    def list(self) -> list[tuple[Tenant, list[dict]]]:
        with self.pool.connection() as conn:
            tenants = conn.execute(
                "SELECT name, tier, webhook_url, webhook_secret FROM tenants ORDER BY name"
            ).fetchall()
            keys = conn.execute(
                "SELECT tenant, id, revoked, expires FROM api_keys ORDER BY tenant, id"
            ).fetchall()
        by: dict[str, list[dict]] = {}
        for tenant, kid, revoked, expires in keys:
            by.setdefault(tenant, []).append(
                {"tenant": tenant, "id": kid, "revoked": revoked, "expires": expires}
            )
        return [(Tenant(*t), by.get(t[0], [])) for t in tenants]

    @_unavailable
    def revoke(self, name: str) -> int:
        """Revoke every key of a tenant; returns how many."""
        with self.pool.connection() as conn, conn.transaction():
            self._existing(conn, name)
            cur = conn.execute(
                "UPDATE api_keys SET revoked = true WHERE tenant = %s AND NOT revoked", (name,)
            )
            return cur.rowcount

    @_unavailable
    def rotate(self, name: str, grace: float = 0.0) -> str:
        """Issue a fresh key; the tenant's other keys stop working after `grace` seconds (0: now). One
        transaction: the old keys never end without the new one in place."""
        check_grace(grace)
        with self.pool.connection() as conn, conn.transaction():
            tier = self._existing(conn, name).tier
            if grace == 0:
                conn.execute("UPDATE api_keys SET revoked = true WHERE tenant = %s AND NOT revoked", (name,))
            else:
                until = time.time() + grace
                conn.execute("UPDATE api_keys SET expires = LEAST(COALESCE(expires, %s), %s) "
                             "WHERE tenant = %s AND NOT revoked", (until, until, name))  # fmt: skip
            return self._add(conn, name, tier)

    @staticmethod
    def _existing(conn, name: str) -> Tenant:
        row = conn.execute(
            "SELECT name, tier, webhook_url, webhook_secret FROM tenants WHERE name = %s FOR UPDATE", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"tenant {name!r} not found")
        return Tenant(*row)

    @_unavailable
    def find(self, name: str) -> Tenant | None:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT name, tier, webhook_url, webhook_secret FROM tenants WHERE name = %s", (name,)
            ).fetchone()
        return Tenant(*row) if row else None

    def get(self, name: str) -> Tenant:
        t = self.find(name)
        if t is None:
            raise NotFound(f"tenant {name!r} not found")
        return t

    @_unavailable
    def active_keys(self, name: str) -> int:
        with self.pool.connection() as conn:
            return conn.execute(f"SELECT count(*) FROM api_keys k WHERE k.tenant = %s AND {_ACTIVE}",
                                (name, time.time())).fetchone()[0]  # fmt: skip

    def authenticate(self, key: str | None) -> Tenant:
        if not key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
        row = self._lookup(key_hash(key))
        if row is None:
            raise Unauthenticated("invalid or revoked API key")
        return Tenant(*row)

    @_unavailable
    def _lookup(self, h: str):
        with self.pool.connection() as conn:
            return conn.execute(
                "SELECT t.name, t.tier, t.webhook_url, t.webhook_secret FROM api_keys k JOIN tenants t "
                f"ON t.name = k.tenant WHERE k.hash = %s AND {_ACTIVE}",
                (h, time.time()),
            ).fetchone()
