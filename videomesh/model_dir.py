"""A local diffusers-layout Wan directory: what it holds, checked before anything loads.

Both the encoder (tokenizer/, text_encoder/) and the denoiser (transformer/, transformer_2/,
vae/, scheduler/) open the same downloaded directory, e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers:

    model_index.json   {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "expand_timesteps": false,
                        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [...] | [null, null],
                        "vae": [...], "text_encoder": [...], "tokenizer": [...], "scheduler": [...]}
    transformer/       the (high-noise) expert
    transformer_2/     the low-noise expert (two-expert layouts only)
    vae/ text_encoder/ tokenizer/ scheduler/

Pure Python and the standard library: a bad directory is reported with the file and what was
expected, before diffusers or transformers are imported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

PIPELINE = "WanPipeline"
DOWNLOAD_HINT = "e.g. `hf download Wan-AI/Wan2.2-T2V-A14B-Diffusers --local-dir DIR`"
# component -> (library, accepted classes, the file that must be in its subfolder, what it is)
COMPONENTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "transformer": ("diffusers", ("WanTransformer3DModel",), ("config.json",), "the (high-noise) DiT expert"),
    "transformer_2": ("diffusers", ("WanTransformer3DModel",), ("config.json",), "the low-noise DiT expert"),
    "vae": ("diffusers", ("AutoencoderKLWan",), ("config.json",), "the causal video VAE"),
    "scheduler": ("diffusers", (), ("scheduler_config.json",), "the sampler's scheduler"),
    "text_encoder": (
        "transformers",
        ("UMT5EncoderModel", "T5EncoderModel"),
        ("config.json",),
        "the UMT5 text encoder",
    ),
    "tokenizer": (
        "transformers",
        (),
        ("tokenizer_config.json", "tokenizer.json", "spiece.model"),
        "the tokenizer",
    ),
}
_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
_NOT_SERVED = {
    "WanImageToVideoPipeline": "image-to-video (Wan2.x I2V) is not served yet",
    "WanVACEPipeline": "Wan VACE is not served",
    "WanVideoToVideoPipeline": "video-to-video is not served",
}


class ModelDirError(ValueError):
    """The model directory is missing, incomplete or not a Wan text-to-video pipeline."""


@dataclass(frozen=True)
class WanModelDir:
    path: Path
    index: dict = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> WanModelDir:
        """Read and check model_index.json (not the components: see `require`)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ModelDirError(
                f"model directory {path} does not exist or is not a directory; expected a diffusers-layout "
                f"Wan directory ({DOWNLOAD_HINT})"
            )
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ModelDirError(
                f"{index_file} not found: expected a diffusers pipeline directory with model_index.json, "
                f"transformer/, vae/, text_encoder/, tokenizer/ and scheduler/ ({DOWNLOAD_HINT})"
            )
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelDirError(f"{index_file}: not readable JSON ({e})") from None
        if not isinstance(index, dict):
            raise ModelDirError(f"{index_file}: expected a JSON object; got {type(index).__name__}")
        name = index.get("_class_name")
        if name != PIPELINE:
            why = _NOT_SERVED.get(str(name), "this backend serves Wan text-to-video pipelines only")
            raise ModelDirError(f"{index_file}: _class_name is {name!r}; expected {PIPELINE!r} ({why})")
        d = cls(path, index)
        if d.two_experts and d.boundary_ratio is None:
            raise ModelDirError(
                f"{index_file}: transformer_2 (a low-noise expert) is listed but boundary_ratio is null; a two-expert "
                "Wan2.2 directory sets boundary_ratio (0.875 for T2V-A14B)"
            )
        if d.boundary_ratio is not None and not 0.0 < d.boundary_ratio <= 1.0:
            raise ModelDirError(f"{index_file}: boundary_ratio must be in (0, 1]; got {d.boundary_ratio}")
        return d

    # --- what model_index.json says ---
    def listed(self, component: str) -> tuple[str, str] | None:
        """(library, class) of a component, None when absent or null (e.g. transformer_2 of one-expert layouts)."""
        entry = self.index.get(component)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None or entry[1] is None:
            return None
        return str(entry[0]), str(entry[1])

    @property
    def two_experts(self) -> bool:
        return self.listed("transformer_2") is not None

    @property
    def boundary_ratio(self) -> float | None:
        b = self.index.get("boundary_ratio")
        return None if b is None else float(b)

    @property
    def expand_timesteps(self) -> bool:
        """Wan2.2-TI2V-5B: a timestep per latent patch (one-expert, 48-channel VAE)."""
        return bool(self.index.get("expand_timesteps", False))

    def class_name(self, component: str) -> str:
        listed = self.listed(component)
        if listed is None:
            raise ModelDirError(f"{self.path / 'model_index.json'}: no {component!r} component listed")
        return listed[1]

    # --- the components on disk ---
    def require(self, *components: str) -> None:
        """Check each component is listed with an accepted class and its subfolder holds config and weights."""
        index_file = self.path / "model_index.json"
        for c in components:
            library, classes, files, what = COMPONENTS[c]
            listed = self.listed(c)
            if listed is None:
                raise ModelDirError(
                    f"{index_file}: component {c!r} ({what}) is missing; expected [{library!r}, "
                    f"{(classes or ('<class>',))[0]!r}]"
                )
            if listed[0] != library or (classes and listed[1] not in classes):
                raise ModelDirError(
                    f"{index_file}: component {c!r} is {list(listed)}; expected [{library!r}, one of {list(classes)}]"
                    if classes
                    else f"{index_file}: component {c!r} is {list(listed)}; expected a {library} class"
                )
            sub = self.path / c
            if not sub.is_dir():
                raise ModelDirError(
                    f"{sub}/ not found, but model_index.json lists {c!r} ({what}); the download is incomplete"
                )
            if not any((sub / f).is_file() for f in files):
                raise ModelDirError(
                    f"{sub}: expected {' or '.join(files)} ({what}); the download is incomplete"
                )
            if c not in ("scheduler", "tokenizer") and not any(any(sub.glob(p)) for p in _WEIGHTS):
                raise ModelDirError(
                    f"{sub}: no weights (*.safetensors or *.bin) for {what}; the download is incomplete"
                )

    def identity(self, *components: str) -> str:
        """A short content-derived id of the components' configs and weight files (names and sizes):
        cheap on 30 GB of weights, and it changes with any re-download of different weights."""
        h = hashlib.sha256()
        for c in components:
            sub = self.path / c
            for f in sorted(p for p in sub.rglob("*") if p.is_file()):
                rel = f.relative_to(self.path).as_posix()
                h.update(rel.encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
                else:
                    h.update(str(f.stat().st_size).encode())
        return h.hexdigest()[:12]

    def config(self, component: str) -> dict:
        f = self.path / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelDirError(f"{f}: not readable JSON ({e})") from None
