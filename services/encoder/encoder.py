"""The text-encoding domain object: validates texts, runs the encoder, names its version."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from services.encoder.model import MAX_PROMPT_CHARS, TEXT_ENCODERS, TextEncoder, detect_language
from videomesh.errors import InvalidArgument, Unavailable
from videomesh.weights import load_into

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_BATCH = 16


@dataclass(frozen=True)
class EncoderSettings:
    model: str = "default"
    weights: Path | None = None  # default: services/encoder/weights/<model>.safetensors
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default

    def validate(self) -> None:
        if self.model not in TEXT_ENCODERS:
            raise ValueError(f"unknown encoder model {self.model!r}; choose one of {sorted(TEXT_ENCODERS)}")


class TextEncoding:
    """Thread-safe wrapper around TextEncoder for the service."""

    def __init__(self, settings: EncoderSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self.model: TextEncoder | None = None
        self.name = ""

    def load(self) -> None:
        torch.manual_seed(0)  # untrained weights are the same on every replica
        model = TextEncoder(TEXT_ENCODERS[self.settings.model]).eval()
        path = self.settings.weights or WEIGHTS_DIR / f"{self.settings.model}.safetensors"
        version = load_into(model, path)
        model.encode([""])  # warm up (and load MiniLM, where fused) before SERVING
        self.model = model
        self.name = f"{self.settings.model}@{version}"

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if self.model is None:
            raise Unavailable("the encoder is still loading its model; retry shortly", retry_after=2.0)
        if not texts:
            raise InvalidArgument("texts: give at least one text", field="texts")
        if len(texts) > MAX_BATCH:
            raise InvalidArgument(
                f"texts: at most {MAX_BATCH} texts per call; got {len(texts)}", field="texts"
            )
        for i, t in enumerate(texts):
            if len(t) > MAX_PROMPT_CHARS:
                raise InvalidArgument(
                    f"texts[{i}]: {len(t)} characters; the limit is {MAX_PROMPT_CHARS}", field=f"texts[{i}]"
                )
        with self._lock, torch.inference_mode():
            states, mask = self.model.encode(texts)
        return states, mask, [detect_language(t) for t in texts]


# What the embedded models can draw: the generated world's shapes and colours (videomesh/world).
WORLD_HINT = (
    "the default model draws coloured balls, boxes and triangles on plain backgrounds, and this prompt "
    "names none of its shapes or colours, so the clip will not show what it describes; try e.g. "
    "'a red ball moving right on a black background'"
)


def world_notes(texts: list[str]) -> list[tuple[int, str, str]]:
    """(index, reason, message) for the prompt (text 0) when it names nothing the world model knows."""
    from videomesh.world.captions import names_in_world

    if not texts or not texts[0].strip():
        return []
    found = names_in_world(texts[0])
    if found["shape"] or found["color"]:
        return []
    return [(0, "PROMPT_OUTSIDE_MODEL_WORLD", WORLD_HINT)]
