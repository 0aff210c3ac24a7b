"""The committed stubs must equal what `make protos` generates from protos/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_stubs_match_regenerated(tmp_path):
    written = _gen().generate(tmp_path)
    assert written, "protoc wrote nothing"
    committed = ROOT / "videomesh" / "v1"
    names = {p.name for p in written}
    assert names == {p.name for p in committed.iterdir() if "_pb2" in p.name}, (
        "stub set differs: run `make protos`"
    )
    for p in written:
        assert p.read_text() == (committed / p.name).read_text(), f"{p.name} is stale: run `make protos`"
