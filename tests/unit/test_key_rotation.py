"""API keys (issue #22): hashed at rest; a rotation keeps the old key valid for a grace period. The same
rules hold for the JSON file (one gateway) and the PostgreSQL tables every replica reads."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from gateway.tenants import TenantDirectory, open_tenants
from videomesh.cli import main as cli_main
from videomesh.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable


@pytest.fixture(params=["json", "postgres"])
def directories(request, tmp_path):
    """-> open(): another directory over the same keys (another process: the gateway, a replica, the CLI)."""
    database = request.getfixturevalue("pg").database() if request.param == "postgres" else ""
    opened = []

    def open_():
        d = open_tenants(tmp_path, database)
        opened.append(d)
        return d

    open_.database = database
    yield open_
    for d in opened:
        d.close()


def test_rotation_with_a_grace_keeps_the_old_key_until_it_ends(directories, monkeypatch):
    d = directories()
    old = d.add("acme", "pro")
    clock = [time.time()]
    monkeypatch.setattr("gateway.tenants.time.time", lambda: clock[0])
    new = d.rotate("acme", grace=60)
    assert d.authenticate(old).name == d.authenticate(new).name == "acme"
    assert d.active_keys("acme") == 2
    other = directories()  # another process reads the same keys: same answer
    assert other.authenticate(old).name == "acme"
    clock[0] += 61
    with pytest.raises(Unauthenticated):
        d.authenticate(old)
    with pytest.raises(Unauthenticated):
        other.authenticate(old)
    assert d.authenticate(new).name == "acme" and d.active_keys("acme") == 1
    # a second rotation never lengthens an earlier key's grace
    newer = d.rotate("acme", grace=3600)
    assert d.authenticate(newer) and d.authenticate(new)
    with pytest.raises(Unauthenticated):
        d.authenticate(old)


def test_rotation_without_a_grace_revokes_now(directories):
    d = directories()
    old = d.add("acme")
    new = d.rotate("acme")
    with pytest.raises(Unauthenticated):
        d.authenticate(old)
    assert d.authenticate(new).name == "acme"
    with pytest.raises(InvalidArgument, match="grace"):
        d.rotate("acme", grace=-1)
    with pytest.raises(NotFound):
        d.rotate("nobody")


def test_a_revocation_holds_on_every_reader_at_once(directories):
    a, b = directories(), directories()
    key = a.add("acme", "pro", "https://hooks.example.com/vm")
    assert b.authenticate(key).tier == "pro"
    assert b.get("acme").webhook_secret == a.get("acme").webhook_secret.strip() != ""
    assert a.revoke("acme") == 1
    with pytest.raises(Unauthenticated):
        b.authenticate(key)
    # adding a key again (--force) keeps the webhook secret and URL unless a new URL is given
    key2 = b.add("acme", "enterprise")
    t = a.authenticate(key2)
    assert (t.tier, t.webhook_url) == ("enterprise", "https://hooks.example.com/vm")
    assert [(x.name, len(keys)) for x, keys in a.list()] == [("acme", 2)]
    with pytest.raises(InvalidArgument, match="tenant name"):
        a.add("no spaces")
    with pytest.raises(Unauthenticated, match="missing"):
        a.authenticate("")


def test_keys_stay_hashed_at_rest(directories, tmp_path):
    d = directories()
    keys = [d.add("acme"), d.add("acme", "pro")]
    if directories.database:
        with psycopg.connect(directories.database) as conn:
            raw = json.dumps(
                [conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("tenants", "api_keys")], default=str
            )
            hashes = [h for (h,) in conn.execute("SELECT hash FROM api_keys")]
    else:
        raw = (tmp_path / "tenants.json").read_text()
        hashes = list(json.loads(raw)["keys"])
    assert not any(k in raw for k in keys)  # only SHA-256 hashes
    assert len(hashes) == 2 and all(len(h) == 64 for h in hashes)


def test_the_json_file_is_imported_once_into_an_empty_database(pg, tmp_path):
    f = TenantDirectory(tmp_path / "tenants.json")
    kept = f.add("acme", "pro", "https://hooks.example.com/vm")
    revoked = f.add("gone")
    f.revoke("gone")
    ending = f.add("bob")
    f.rotate("bob", grace=3600)
    url = pg.database()
    db = open_tenants(tmp_path, url)
    try:
        assert db.authenticate(kept).webhook_secret == f.get("acme").webhook_secret
        with pytest.raises(Unauthenticated):
            db.authenticate(revoked)
        assert db.authenticate(ending).name == "bob" and db.active_keys("bob") == 2
        later = f.add("late")  # written to the file after the import: the database is the directory now
        again = open_tenants(tmp_path, url)
        with pytest.raises(Unauthenticated):
            again.authenticate(later)
        again.close()
    finally:
        db.close()


def test_a_database_that_cannot_answer_is_unavailable_not_a_refusal(pg, tmp_path):
    d = open_tenants(tmp_path, pg.database())
    key = d.add("acme")
    d.pool.close()
    with pytest.raises(Unavailable):
        d.authenticate(key)


def test_the_cli_rotates_with_a_grace(tmp_path, capsys):
    assert cli_main(["tenants", "add", "bob", "--data-dir", str(tmp_path)]) == 0
    old = capsys.readouterr().out.strip()
    assert cli_main(["tenants", "rotate", "bob", "--grace", "300", "--data-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    new = out.strip()
    assert "300 s" in err
    d = TenantDirectory(tmp_path / "tenants.json")
    assert d.authenticate(old).name == d.authenticate(new).name == "bob"


def test_the_cli_edits_the_gateways_database(pg, tmp_path, capsys, monkeypatch):
    url = pg.database()
    secret = tmp_path / "database-url"
    secret.write_text(url + "\n")
    monkeypatch.delenv("VIDEOMESH_GATEWAY_DATABASE", raising=False)
    monkeypatch.delenv("VIDEOMESH_CONFIG", raising=False)
    monkeypatch.setenv("VIDEOMESH_GATEWAY_DATABASE_FILE", str(secret))  # as in the gateway's container
    assert cli_main(["tenants", "add", "carol", "--tier", "pro", "--data-dir", str(tmp_path / "none")]) == 0
    key = capsys.readouterr().out.strip()
    assert not (tmp_path / "none" / "tenants.json").exists()
    d = open_tenants(tmp_path / "none", url)
    try:
        assert d.authenticate(key).tier == "pro"
        assert cli_main(["tenants", "list", "--data-dir", str(tmp_path / "none")]) == 0
        assert "carol" in capsys.readouterr().out
        assert cli_main(["tenants", "revoke", "carol", "--database", url]) == 0
        with pytest.raises(Unauthenticated):
            d.authenticate(key)
    finally:
        d.close()
    bad = url.rsplit("/", 1)[0] + "/no_such_db"
    assert cli_main(["tenants", "list", "--database", bad]) == 1
    assert "cannot open the tenants" in capsys.readouterr().err


def test_the_cli_never_imports_by_the_way_and_imports_when_asked(pg, tmp_path, capsys):
    url = pg.database()
    local = TenantDirectory(tmp_path / "tenants.json")  # a laptop's own `videomesh up` tenants (the dev key)
    dev = local.add("dev", "pro")
    assert cli_main(["tenants", "add", "prod-co", "--database", url, "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    db = open_tenants(tmp_path / "elsewhere", url)
    try:
        assert [t.name for t, _ in db.list()] == ["prod-co"]  # the local dev tenant did not travel
        with pytest.raises(Unauthenticated):
            db.authenticate(dev)
        gone = local.add("gone")
        db_gone_key = db.add("gone")  # already in the database, then revoked there
        db.revoke("gone")
        local_file = str(tmp_path / "tenants.json")
        assert cli_main(["tenants", "import", local_file, "--database", url]) == 0
        # dev and its key; not "gone", which the database has: its file key does not revive the tenant
        assert "imported 1 tenant(s) and 1 key(s)" in capsys.readouterr().out
        assert db.authenticate(dev).name == "dev"
        for key in (gone, db_gone_key):  # nothing already there is changed: revoked stays revoked
            with pytest.raises(Unauthenticated):
                db.authenticate(key)
    finally:
        db.close()
    assert cli_main(["tenants", "import", local_file]) == 2  # no database: a usage error
    assert cli_main(["tenants", "import", str(tmp_path / "nope.json"), "--database", url]) == 2


def test_database_passwords_stay_out_of_what_the_cli_prints():
    from videomesh.cli import _redact, _redact_text

    url = "postgresql://vm:s%40cret@db.internal/videomesh?sslmode=require"
    assert _redact(url) == "postgresql://vm:***@db.internal/videomesh?sslmode=require"
    assert "s@cret" not in _redact_text('invalid percent-encoded token: "s@cret"', url)
    assert _redact("postgresql://db.internal/videomesh?password=hunter22") == (
        "postgresql://db.internal/videomesh?password=***"
    )
