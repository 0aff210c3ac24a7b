"""API keys (issue #22): hashed at rest; a rotation keeps the old key valid for a grace period."""

from __future__ import annotations

import json
import time

import pytest

from gateway.tenants import TenantDirectory
from videomesh.cli import main as cli_main
from videomesh.errors import InvalidArgument, Unauthenticated


def test_rotation_with_a_grace_keeps_the_old_key_until_it_ends(tmp_path, monkeypatch):
    d = TenantDirectory(tmp_path / "tenants.json")
    old = d.add("acme", "pro")
    clock = [time.time()]
    monkeypatch.setattr("gateway.tenants.time.time", lambda: clock[0])
    new = d.rotate("acme", grace=60)
    assert d.authenticate(old).name == d.authenticate(new).name == "acme"
    assert d.active_keys("acme") == 2
    # another process (the gateway) reads the same file: same answer
    other = TenantDirectory(tmp_path / "tenants.json")
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


def test_rotation_without_a_grace_revokes_now_and_keys_stay_hashed(tmp_path):
    d = TenantDirectory(tmp_path / "tenants.json")
    old = d.add("acme")
    new = d.rotate("acme")
    with pytest.raises(Unauthenticated):
        d.authenticate(old)
    assert d.authenticate(new).name == "acme"
    raw = (tmp_path / "tenants.json").read_text()
    assert old not in raw and new not in raw  # only SHA-256 hashes at rest
    assert all(len(h) == 64 for h in json.loads(raw)["keys"])
    with pytest.raises(InvalidArgument, match="grace"):
        d.rotate("acme", grace=-1)


def test_the_cli_rotates_with_a_grace(tmp_path, capsys):
    assert cli_main(["tenants", "add", "bob", "--data-dir", str(tmp_path)]) == 0
    old = capsys.readouterr().out.strip()
    assert cli_main(["tenants", "rotate", "bob", "--grace", "300", "--data-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    new = out.strip()
    assert "300 s" in err
    d = TenantDirectory(tmp_path / "tenants.json")
    assert d.authenticate(old).name == d.authenticate(new).name == "bob"
