"""LoRAs for the Wan backend, per request: brand styles and few-step distillation LoRAs.

Layout in the denoiser's adapters_dir (names as videomesh/adapters.py: "name" public,
"tenant/name" that tenant's):

- `<name>.safetensors`: one LoRA. A one-expert model (Wan2.1 T2V, Wan2.2 TI2V-5B) applies it to
  its transformer; Wan2.2 T2V-A14B applies the same file to both experts (as
  `pipe.load_lora_weights(f)` and `pipe.load_lora_weights(f, load_into_transformer_2=True)`).
- `<name>/high_noise.safetensors` and/or `<name>/low_noise.safetensors` (also accepted:
  `high_noise_model.safetensors` / `low_noise_model.safetensors`, the names lightx2v ships its
  Wan2.2 A14B LoRAs under, so such a folder can be copied in as it is): one LoRA per expert of
  Wan2.2 T2V-A14B, `high_noise` for `transformer`, `low_noise` for `transformer_2`. An expert without
  a file runs its base weights. A one-expert model refuses this layout (FAILED_PRECONDITION).

A file is in any format diffusers' WanLoraLoaderMixin reads: diffusers/PEFT keys
(`transformer.blocks.N.attn1.to_q.lora_A.weight`), the original Wan / lightx2v / kohya keys
(`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, with `alpha` and `diff_b` biases) and
musubi-tuner's (`lora_unet_blocks_N_...`); they are converted by
`WanLoraLoaderMixin.lora_state_dict` and put into an expert by
`WanLoraLoaderMixin.load_lora_into_transformer` (PEFT LoRA layers), the calls
`WanPipeline.load_lora_weights` makes, so a request gives the pipeline's frames with the same LoRA
loaded (tests/unit/test_wan_lora.py, bit for bit in bf16).

Applied per request, restored exactly: the LoRA layers stay unmerged beside the base weights, which
are never written. A request with an adapter activates that adapter at its strength
(`set_adapters(name, weights=strength)`, as `pipe.set_adapters`); a request without one disables
every LoRA layer, which then returns its base layer's output as it is — the base model's bits. Each
expert keeps up to `capacity` LoRAs loaded (least recently used deleted); a changed file (size or
mtime) is read again and its old layers deleted. Adapters are checked against the expert they go
into before anything is loaded: a tensor for a layer the model does not have, or of the wrong shape,
is FAILED_PRECONDITION (ADAPTER_MISMATCH), never a traceback at the first step.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from videomesh.adapters import NAME_RE, check_name
from videomesh.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("videomesh.denoiser.wan")
SUFFIX = ".safetensors"
# per-expert file names in an adapter folder (ours first, then lightx2v's)
EXPERT_FILES = {
    "high_noise": ("high_noise", "high_noise_model"),
    "low_noise": ("low_noise", "low_noise_model"),
}
_PART_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
DEFAULT_MODEL_FORMAT = "videomesh-lora/1"  # services/denoiser/lora.py: the built-in model's adapters


def _mismatch(msg: str) -> FailedPrecondition:
    return FailedPrecondition(msg, reason="ADAPTER_MISMATCH")


@dataclass
class WanLora:
    """One installed adapter, converted to diffusers keys, per expert it applies to."""

    name: str
    version: str  # first 12 hex digits of the SHA-256 of its file (of its files' digests, for a folder)
    # expert -> (state dict with "transformer." keys, diffusers' LoRA metadata or None)
    parts: dict[str, tuple[dict[str, torch.Tensor], dict | None]]
    description: str = ""
    rank: int = 0
    stamp: tuple = field(default=(), repr=False)  # (path, size, mtime_ns) of its files

    @property
    def key(self) -> str:
        """The PEFT adapter name: one per name and file version."""
        return "vmlora_" + hashlib.sha256(f"{self.name}@{self.version}".encode()).hexdigest()[:16]

    def parameters(self) -> int:
        return sum(v.numel() for sd, _ in self.parts.values() for v in sd.values())


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _header(path: Path) -> tuple[dict, dict[str, list[int]]]:
    """A safetensors file's metadata and tensor shapes, without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {}), {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _complete_biases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT gives every layer a LoRA bias when any layer has one (lightx2v's `diff_b`): a layer without
    one gets zeros (the same delta), rather than a bias left on the meta device."""
    if not any(k.endswith(".lora_B.bias") for k in sd):
        return sd
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith(".lora_B.weight") and v.ndim == 2:
            out.setdefault(k[: -len("weight")] + "bias", torch.zeros(v.shape[0], dtype=v.dtype))
    return out


def check_fit(state_dict: dict[str, torch.Tensor], model: nn.Module, where: str) -> int:
    """Raise ADAPTER_MISMATCH unless every tensor of a converted LoRA state dict (`transformer.`
    keys) is the down / up matrix or bias of a Linear layer `model` has, of that layer's shape;
    return the largest rank."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if not k.startswith("transformer."):
            raise _mismatch(f"{where}: tensor {k!r} is not for a Wan transformer (diffusers LoRA keys start "
                            "with 'transformer.', original Wan / lightx2v keys with 'diffusion_model.')")  # fmt: skip
        rest = k[len("transformer.") :]
        suffix = next((s for s in _PART_SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            raise _mismatch(f"{where}: tensor {k!r} is not a LoRA down / up matrix or bias")
        layers.setdefault(rest[: -len(suffix)], {})[suffix] = v
    if not layers:
        raise _mismatch(f"{where}: no LoRA tensors")
    rank = 0
    for path, parts in layers.items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise _mismatch(f"{where}: this model has no layer {path!r}") from None
        mod = getattr(mod, "base_layer", mod)  # already wrapped by a LoRA loaded before
        if not isinstance(mod, nn.Linear):
            raise _mismatch(
                f"{where}: layer {path!r} is a {type(mod).__name__}; LoRAs here adapt Linear layers"
            )
        down, up, bias = (parts.get(s) for s in _PART_SUFFIXES)
        if down is None or up is None:
            raise _mismatch(f"{where}: layer {path!r} lacks its {'down' if down is None else 'up'} matrix")
        if (down.ndim != 2 or up.ndim != 2 or down.shape[1] != mod.in_features or up.shape[0] != mod.out_features
                or up.shape[1] != down.shape[0] or (bias is not None and list(bias.shape) != [mod.out_features])):  # fmt: skip
            raise _mismatch(
                f"{where}: layer {path!r} is Linear({mod.in_features} -> {mod.out_features}); the LoRA has "
                f"up {list(up.shape)} @ down {list(down.shape)}"
                + (f", bias {list(bias.shape)}" if bias is not None else "")
                + " — it was made for another Wan model (check 14B / 5B / 1.3B)"
            )
        rank = max(rank, down.shape[0])
    return rank


class WanLoras:
    """The adapters of one WanBackend: found in `root`, loaded lazily, checked against the experts,
    activated per forward. `experts`: the model's expert names (("high_noise", "low_noise") or
    ("transformer",)); `models`: the loaded ones (expert -> WanTransformer3DModel).

    `get` may be called from any thread; `use` only where the forwards run (one at a time)."""

    def __init__(
        self, root: Path | None, experts: tuple[str, ...], models: dict[str, nn.Module], capacity: int = 4
    ):
        if capacity < 1:
            raise ValueError(f"adapter capacity must be at least 1; got {capacity}")
        self.root = Path(root) if root is not None else None
        self.experts = experts
        self.models = models
        self.capacity = capacity
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, WanLora] = OrderedDict()  # name -> loaded, least recent first
        self._failed: dict[str, tuple[tuple, str]] = {}  # name -> (stamp, why): left out of the listing
        self._digests: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256
        # per expert: the PEFT adapters in the model (key -> name), least recent first; what is active
        self._loaded: dict[str, OrderedDict[str, str]] = {e: OrderedDict() for e in experts}
        self._active: dict[str, tuple[str, float] | None] = dict.fromkeys(experts)
        self.loads = 0  # files read (tests)
        self.evictions = 0  # loaded LoRAs dropped to make room for another (thrashing shows here)

    # --- finding ---
    def names(self) -> list[str]:
        """Installed names: <root>/<name>.safetensors, <root>/<name>/{high,low}_noise*.safetensors, and
        the same one folder down for a tenant's."""
        if self.root is None or not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_file() and p.name.endswith(SUFFIX):
                out.append(p.name[: -len(SUFFIX)])
            elif p.is_dir():
                if self._expert_files(p):
                    out.append(p.name)
                    continue
                for q in p.iterdir():  # a tenant's folder
                    if (q.is_file() and q.name.endswith(SUFFIX)) or (q.is_dir() and self._expert_files(q)):
                        out.append(f"{p.name}/{q.name.removesuffix(SUFFIX)}")
        return sorted(n for n in out if NAME_RE.match(n))

    @staticmethod
    def _expert_files(folder: Path) -> dict[str, Path]:
        out = {}
        for expert, stems in EXPERT_FILES.items():
            found = [folder / f"{s}{SUFFIX}" for s in stems if (folder / f"{s}{SUFFIX}").is_file()]
            if len(found) > 1:
                raise FailedPrecondition(f"adapter folder {folder}: both {found[0].name} and {found[1].name} are "
                                         f"there for the {expert} expert; keep one", reason="ADAPTER_MISMATCH")  # fmt: skip
            if found:
                out[expert] = found[0]
        return out

    def files(self, name: str) -> dict[str, Path]:
        """expert -> file of an installed adapter; NotFound when there is none."""
        try:
            check_name(name)
        except ValueError as e:
            raise InvalidArgument(str(e), field="adapter") from None
        if self.root is None:
            raise NotFound(f"no style adapter {name!r} is installed (this denoiser has no adapters directory)",
                           reason="ADAPTER_NOT_FOUND")  # fmt: skip
        single = self.root / f"{name}{SUFFIX}"
        folder = self.root / name
        per_expert = self._expert_files(folder) if folder.is_dir() else {}
        if single.is_file() and per_expert:
            raise FailedPrecondition(f"adapter {name!r}: both {single} and the folder {folder} are installed; keep one",
                                     reason="ADAPTER_MISMATCH")  # fmt: skip
        if single.is_file():
            return dict.fromkeys(self.experts, single)
        if not per_expert:
            raise NotFound(f"no style adapter {name!r} is installed", reason="ADAPTER_NOT_FOUND")
        if set(self.experts) != set(EXPERT_FILES):
            raise _mismatch(f"adapter {name!r} is a folder of per-expert LoRAs (high_noise / low_noise) for "
                            f"Wan2.2 T2V-A14B; this model has one expert: install a single {name}{SUFFIX}")  # fmt: skip
        return per_expert

    @staticmethod
    def _stamp(files: dict[str, Path]) -> tuple:
        out = []
        for p in sorted(set(files.values())):
            try:
                st = p.stat()
            except FileNotFoundError:  # removed meanwhile
                return ()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _version(self, stamp: tuple) -> str:
        digests = []
        for s in stamp:
            d = self._digests.get(s)
            if d is None:
                d = self._digests[s] = _digest(Path(s[0]))
            digests.append(d)
        return (
            digests[0][:12]
            if len(digests) == 1
            else hashlib.sha256("".join(digests).encode()).hexdigest()[:12]
        )

    # --- loading ---
    def get(self, name: str) -> WanLora:
        """The installed adapter `name`, loaded and checked against the loaded experts (again when a
        file changed). NotFound, FailedPrecondition (ADAPTER_MISMATCH), InvalidArgument (a bad name)."""
        files = self.files(name)
        stamp = self._stamp(files)
        if not stamp:
            raise NotFound(f"no style adapter {name!r} is installed", reason="ADAPTER_NOT_FOUND")
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached.stamp == stamp:
                self._cache.move_to_end(name)
                return cached
        try:
            lora = self._load(name, files, stamp)
        except FailedPrecondition as e:
            with self._lock:
                self._failed[name] = (stamp, str(e))
            raise
        with self._lock:
            self._failed.pop(name, None)
            self._cache[name] = lora
            self._cache.move_to_end(name)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return lora

    def _load(self, name: str, files: dict[str, Path], stamp: tuple) -> WanLora:
        from diffusers.loaders import WanLoraLoaderMixin

        by_file: dict[Path, tuple[dict, dict | None]] = {}
        description = ""
        for path in sorted(set(files.values())):
            try:
                meta, _ = _header(path)
            except Exception as e:  # noqa: BLE001 - any unreadable header
                raise _mismatch(
                    f"adapter {name!r}: {path.name} is not a readable safetensors file: {e}"
                ) from None
            if meta.get("format") == DEFAULT_MODEL_FORMAT:
                raise _mismatch(f"adapter {name!r} is a {DEFAULT_MODEL_FORMAT} adapter for the built-in model "
                                f"{meta.get('base_model', '')!r}, not a Wan LoRA")  # fmt: skip
            description = description or meta.get("description", "")
            try:
                sd, lora_meta = WanLoraLoaderMixin.lora_state_dict(
                    str(path), use_safetensors=True, return_lora_metadata=True
                )
            except Exception as e:  # noqa: BLE001 - diffusers' converters raise ValueError, KeyError, ...
                raise _mismatch(f"adapter {name!r}: {path.name} is not a Wan LoRA diffusers can read: "
                                f"{type(e).__name__}: {e}") from None  # fmt: skip
            if not all("lora" in k for k in sd):  # what load_lora_weights requires
                bad = next(k for k in sd if "lora" not in k)
                raise _mismatch(f"adapter {name!r}: {path.name} has tensor {bad!r}, not a LoRA matrix")
            by_file[path] = (_complete_biases(sd), lora_meta)
            self.loads += 1
        parts, rank = {}, 0
        for expert, path in files.items():
            sd, lora_meta = by_file[path]
            model = self.models.get(expert)
            if model is not None:
                rank = max(rank, check_fit(sd, model, f"adapter {name!r} ({path.name}, {expert} expert)"))
            parts[expert] = (sd, lora_meta)
        log.info("wan adapter %s: %s", name, ", ".join(f"{e} <- {p.name}" for e, p in files.items()))
        return WanLora(name, self._version(stamp), parts, description, rank, stamp)

    # --- applying ---
    @torch.no_grad()
    def use(self, expert: str, lora: WanLora | None, strength: float = 1.0) -> None:
        """Make `expert`'s next forwards those of its base weights plus `strength` x the LoRA's (its
        base weights alone for None, or when the adapter has no file for this expert)."""
        model = self.models[expert]
        part = lora.parts.get(expert) if lora is not None else None
        want = (lora.key, float(strength)) if part is not None else None
        if want == self._active[expert]:
            return
        if want is None:
            model.disable_lora()  # every LoRA layer returns its base layer's output unchanged
            self._active[expert] = None
            return
        loaded = self._loaded[expert]
        if lora.key not in loaded:
            from diffusers.loaders import WanLoraLoaderMixin
            from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA

            stale = [k for k, n in loaded.items() if n == lora.name]  # earlier versions of its file
            while len(loaded) - len(stale) >= self.capacity:
                stale.append(next(k for k in loaded if k not in stale))
            if stale:
                evicted = [k for k in stale if loaded[k] != lora.name]
                if evicted:  # more distinct adapters in flight than the cache holds: each switch reloads
                    self.evictions += len(evicted)
                    log.warning("wan adapters: %s expert evicts %s to load %s (adapter_cache %d); with more "
                                "adapters in flight than that, every switch reloads a LoRA", expert,
                                ", ".join(evicted), lora.key, self.capacity)  # fmt: skip
                model.delete_adapters(stale)
                for k in stale:
                    del loaded[k]
            sd, lora_meta = part
            # what WanPipeline.load_lora_weights does for this transformer (it copies the dict too); several
            # adapters in one model is what we mean to have, so PEFT's warning about it is not shown
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                WanLoraLoaderMixin.load_lora_into_transformer(
                    dict(sd), transformer=model, adapter_name=lora.key, metadata=lora_meta,
                    low_cpu_mem_usage=_LOW_CPU_MEM_USAGE_DEFAULT_LORA,
                )  # fmt: skip
            loaded[lora.key] = lora.name
        loaded.move_to_end(lora.key)
        model.set_adapters([lora.key], weights=[float(strength)])
        model.enable_lora()
        self._active[expert] = want

    # --- listing ---
    def infos(self) -> list[dict]:
        """name, description, rank, parameters, version of each installed adapter, from the files'
        headers (no tensors read); those found unusable (a check failed for the file as it is now,
        a built-in-model adapter, an unreadable file) are left out."""
        out = []
        for name in self.names():
            try:
                files = self.files(name)
                stamp = self._stamp(files)
                if not stamp:
                    continue
                with self._lock:
                    failed = self._failed.get(name)
                if failed is not None and failed[0] == stamp:
                    continue
                description, rank, params = "", 0, 0
                for s in stamp:
                    meta, shapes = _header(Path(s[0]))
                    if meta.get("format") == DEFAULT_MODEL_FORMAT:
                        raise _mismatch("a built-in-model adapter")
                    description = description or meta.get("description", "")
                    for k, shape in shapes.items():
                        if k.endswith(("lora_A.weight", "lora_down.weight")) and shape:
                            rank = max(rank, shape[0])
                        if not k.endswith(".alpha"):
                            params += int(torch.Size(shape).numel())
                version = self._version(stamp)
            except Exception as err:  # noqa: BLE001 - an unusable adapter is left out of the listing
                log.warning("wan adapter %s is installed but unusable: %s", name, err)
                continue
            out.append({"name": name, "description": description, "rank": rank, "parameters": params,
                        "version": version})  # fmt: skip
        return out
