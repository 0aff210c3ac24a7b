"""Load and save module weights as safetensors, with a content-derived version string."""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

UNTRAINED = "untrained"


def file_version(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def load_into(module: nn.Module, path: Path | None, *, prefix: str = "") -> str:
    """Load `prefix`-ed tensors from path into module (strict); return the weights' version.

    A missing file leaves the module's seeded initialisation and returns "untrained", so
    the mesh still runs (and says so) before `make train` has produced weights.
    """
    if path is None or not Path(path).exists():
        return UNTRAINED
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if prefix:
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the model config (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "retrain with `make train` or pick the matching --model"
        )
    return file_version(Path(path))


def metadata(path: Path) -> dict[str, str]:
    """The string metadata a safetensors file was saved with (empty if none); reads no tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def save(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> str:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return file_version(path)
