"""Brand style adapters: low-rank (LoRA) weight deltas for the denoiser's two experts.

An adapter file is safetensors: for every adapted layer `<path>.lora_down` (rank, fan_in) and
`<path>.lora_up` (out, rank), where a Linear's or a convolution's weight is seen as
(out, fan_in) — fan_in = in_channels × kernel size — and the layer's delta is
alpha / rank · up @ down. Metadata: format, base model, rank, alpha, description.

Names and ownership: videomesh/adapters.py (the gateway enforces who may use which).

Serving merges an adapter into the weights for a request and afterwards restores the exact
saved originals (`AdapterSlot`); training (`services/denoiser/train_adapter.py`) puts the same
delta in as a parametrization, so only `down` and `up` learn and the base stays frozen.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from videomesh.adapters import check_name, owner  # noqa: F401 - re-exported
from videomesh.weights import file_version

FORMAT = "videomesh-lora/1"
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0
    # every Linear / Conv of both experts except these (the motion heads classify motion words:
    # a style must not change what "left" means)
    exclude: tuple[str, ...] = ("motion",)


def adaptable(model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Module]:
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, ADAPTABLE) and not any(part in cfg.exclude for part in path.split(".")):
            out[path] = mod
    return out


@dataclass
class Adapter:
    name: str
    base_model: str
    rank: int
    alpha: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (down (r, fan_in), up (out, r))
    description: str = ""
    base_version: str = ""  # the base weights it was trained on ("" = not recorded)
    version: str = ""  # this adapter's file (sha256 prefix), so a replaced file is merged afresh
    base_encoder: str = ""  # the text encoder whose states it was trained on, "<model>@<version>"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> int:
        return sum(d.numel() + u.numel() for d, u in self.layers.values())

    def delta(self, path: str, weight: torch.Tensor) -> torch.Tensor:
        down, up = self.layers[path]
        return (self.scale * (up.float() @ down.float())).reshape(weight.shape)

    def save(self, path: Path) -> None:
        tensors = {}
        for p, (d, u) in self.layers.items():
            tensors[f"{p}.lora_down"] = d.detach().to(torch.bfloat16).contiguous()
            tensors[f"{p}.lora_up"] = u.detach().to(torch.bfloat16).contiguous()
        meta = {"format": FORMAT, "name": self.name, "base_model": self.base_model, "rank": str(self.rank),
                "alpha": str(self.alpha), "description": self.description, "base_version": self.base_version,
                "base_encoder": self.base_encoder}  # fmt: skip
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path, name: str) -> Adapter:
        layers: dict[str, list] = {}
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} adapter (format {meta.get('format')!r})")
            for key in f.keys():
                p, kind = key.rsplit(".", 1)
                if kind not in ("lora_down", "lora_up"):
                    raise ValueError(f"{path}: unexpected tensor {key}")
                layers.setdefault(p, [None, None])[kind == "lora_up"] = f.get_tensor(key).float()
        if any(d is None or u is None for d, u in layers.values()):
            raise ValueError(f"{path}: a layer lacks its down or up matrix")
        return cls(name, meta["base_model"], int(meta["rank"]), float(meta["alpha"]),
                   {p: (d, u) for p, (d, u) in layers.items()}, meta.get("description", ""),
                   meta.get("base_version", ""), file_version(path), meta.get("base_encoder", ""))  # fmt: skip

    def under(self, prefix: str) -> Adapter:
        """The layers below module `prefix` ("experts.high_noise."), renamed relative to it: what
        one expert shard applies."""
        return Adapter(self.name, self.base_model, self.rank, self.alpha,
                       {p[len(prefix):]: v for p, v in self.layers.items() if p.startswith(prefix)},
                       self.description, self.base_version, self.version, self.base_encoder)  # fmt: skip

    def info(self) -> dict:
        return {"name": self.name, "base_model": self.base_model, "rank": self.rank, "layers": len(self.layers),
                "parameters": self.parameters(), "description": self.description}  # fmt: skip


# --- serving ------------------------------------------------------------------------------------


class LRU:
    """A bounded map that forgets its least recently used entry: the adapter caches of the
    engine, of each Ray shard and of the Ray driver's object refs. Values are never None."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def __iter__(self) -> Iterator:  # least recently used first
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class AdapterSlot:
    """At most one adapter merged into a model at a time, swapped between requests.

    `use(adapter, strength)` adds strength × the adapter's delta to the targeted weights after
    saving them; `use(None)` (or another adapter) first copies the saved originals back, so the
    base weights return bit for bit. Not thread-safe: the engine calls it under its lock."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: tuple[str, str, float] | None = None
        self._saved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def use(self, adapter: Adapter | None, strength: float = 1.0) -> None:
        key = None if adapter is None or strength == 0 else (adapter.name, adapter.version, float(strength))
        if key == self.active:
            return
        self.restore()
        if key is None:
            return
        mods = {}
        for path, (down, up) in adapter.layers.items():
            try:
                mod = self.model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"adapter {adapter.name!r}: the model has no layer {path!r}") from None
            w = mod.weight
            if up.shape[0] != w.shape[0] or down.shape[1] != w[0].numel() or up.shape[1] != down.shape[0]:
                raise ValueError(f"adapter {adapter.name!r}: layer {path!r} has shape {list(w.shape)}, "
                                 f"the adapter {list(up.shape)} @ {list(down.shape)}")  # fmt: skip
            mods[path] = mod
        for path, mod in mods.items():  # checked all first: a bad adapter changes nothing
            self._saved[path] = mod.weight.detach().clone()
            mod.weight.add_(strength * adapter.delta(path, mod.weight).to(mod.weight.dtype))
        self.active = key

    @torch.no_grad()
    def restore(self) -> None:
        for path, w in self._saved.items():
            self.model.get_submodule(path).weight.copy_(w)
        self._saved.clear()
        self.active = None


# --- training -----------------------------------------------------------------------------------


class _LowRank(nn.Module):
    """weight -> weight + scale · up @ down (a parametrization; `down` random, `up` zero, so
    training starts at the base model)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        fan_in = weight[0].numel()
        self.scale = scale
        self.down = nn.Parameter(torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in))
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.up @ self.down)).reshape(weight.shape).to(weight.dtype)


def attach(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[nn.Parameter]:
    """Freeze `model` and give every adaptable layer a trainable low-rank delta; -> its params."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params = []
    for mod in adaptable(model, cfg).values():
        lr = _LowRank(mod.weight, cfg.rank, cfg.alpha / cfg.rank, g)
        parametrize.register_parametrization(mod, "weight", lr, unsafe=True)
        params += [lr.down, lr.up]
    return params


def detach(model: nn.Module, cfg: LoRAConfig, *, name: str, base_model: str, description: str = "",
           base_version: str = "", base_encoder: str = "") -> Adapter:  # fmt: skip
    """Take the trained deltas out of `model` (which returns to its base weights) as an Adapter."""
    layers = {}
    for path, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            lr = mod.parametrizations.weight[0]
            layers[path] = (lr.down.detach().clone(), lr.up.detach().clone())
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    return Adapter(check_name(name), base_model, cfg.rank, cfg.alpha, layers, description, base_version,
                   base_encoder=base_encoder)  # fmt: skip
