from dataclasses import dataclass
from pathlib import Path

import pytest

from videomesh.config import ConfigError, load


@dataclass(frozen=True)
class S:
    port: int = 0
    name: str = "x"
    ratio: float = 1.0
    on: bool = False
    sizes: tuple[str, ...] = ("a",)
    path: Path | None = None

    def validate(self):
        if self.port < 0:
            raise ValueError("port must not be negative")


def test_env_overrides_defaults_and_converts_types():
    s = load(
        S,
        "P_",
        env={"P_PORT": "50", "P_ON": "yes", "P_SIZES": "1x1, 2x2", "P_PATH": "/tmp/x", "P_RATIO": "0.5"},
    )
    assert s == S(port=50, on=True, sizes=("1x1", "2x2"), path=Path("/tmp/x"), ratio=0.5)


def test_file_then_env_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[p]\nport = 7\nname = "file"\n')
    s = load(S, "VIDEOMESH_P_", file=f, env={"VIDEOMESH_P_NAME": "env"}, ratio=2.0)
    assert (s.port, s.name, s.ratio) == (7, "env", 2.0)


def test_bad_value_names_the_variable():
    with pytest.raises(ConfigError, match="P_PORT"):
        load(S, "P_", env={"P_PORT": "eighty"})


def test_unknown_file_key_and_validate(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[p]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load(S, "VIDEOMESH_P_", file=f, env={})
    with pytest.raises(ValueError, match="negative"):
        load(S, "P_", env={"P_PORT": "-1"})
