"""Typed settings: dataclass defaults, overridden by a TOML file, overridden by env vars.

Each service declares a frozen dataclass; `load(Settings, prefix="VIDEOMESH_DENOISER_")`
reads `VIDEOMESH_DENOISER_<FIELD>` variables (or `<FIELD>_FILE`: the value is that file's content, for
secrets mounted as files, so they stay out of argv, the environment and logs) and an optional TOML file (`VIDEOMESH_CONFIG`,
table named after the prefix), converts them to the declared types and fails at start-up
with a message naming the variable, instead of at the first request.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _convert(raw: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("", "none", "null")):
            return None
        return _convert(raw, args[0], where)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(typ) or (str,)
        items = raw if isinstance(raw, list | tuple) else [x for x in str(raw).split(",") if x.strip()]
        conv = [_convert(x.strip() if isinstance(x, str) else x, inner, where) for x in items]
        return tuple(conv) if origin is tuple else conv
    if origin is dict:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table, got {raw!r}")
        return dict(raw)
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is Path:
            return Path(os.path.expanduser(str(raw)))
        return typ(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: cannot read {raw!r} as {getattr(typ, '__name__', typ)}") from err


def _read_secret(path: str, var: str) -> str:
    """The value a `<VAR>_FILE` variable points at, without its trailing newline; never logged."""
    try:
        return Path(os.path.expanduser(path)).read_text().rstrip("\r\n")
    except OSError as err:
        raise ConfigError(f"{var}: cannot read {path!r} ({err.strerror or err})") from err


def load(
    cls: type[T],
    prefix: str,
    *,
    file: str | Path | None = None,
    env: dict | None = None,
    validate: bool = True,
    **overrides,
) -> T:
    """Build `cls` from defaults < TOML table < environment < keyword overrides; then its validate()
    unless `validate` is False (a tool that reads one setting of a service)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    file = file or env.get("VIDEOMESH_CONFIG")
    table = prefix.removeprefix("VIDEOMESH_").rstrip("_").lower()
    if file:
        data = tomllib.loads(Path(file).read_text())
        for k, v in data.get(table, {}).items():
            if k not in hints:
                raise ConfigError(f"{file}: [{table}] has unknown setting {k!r}")
            values[k] = _convert(v, hints[k], f"{file}:[{table}].{k}")
    for f in dataclasses.fields(cls):
        var = prefix + f.name.upper()
        if var in env:
            values[f.name] = _convert(env[var], hints[f.name], var)
        elif env.get(var + "_FILE"):  # a secret mounted as a file (Docker/Kubernetes secrets): its content
            secret = _read_secret(env[var + "_FILE"], var + "_FILE")
            try:
                values[f.name] = _convert(secret, hints[f.name], var)
            except ConfigError:  # its message would quote the secret
                kind = getattr(hints[f.name], "__name__", hints[f.name])
                raise ConfigError(f"{var}_FILE: the file's content is not a valid {kind}") from None
    for k, v in overrides.items():
        if v is not None:
            values[k] = v
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check and validate:
        check()
    return obj
