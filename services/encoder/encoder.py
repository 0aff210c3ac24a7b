"""The text-encoding domain object: validates texts, runs the encoder, names its version.

Two kinds of encoder: the embedded default (`model="default"`, weights in services/encoder/weights)
and UMT5 for the Wan backend (`model="wan2.2"`, tokenizer/ and text_encoder/ of a diffusers-layout
`model_dir`, bf16, states zero-padded to 512 tokens exactly as WanPipeline prepares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from services.encoder.model import MAX_PROMPT_CHARS, TEXT_ENCODERS, TextEncoder, detect_language
from videomesh.codec import MAX_MESSAGE_BYTES, TEXT_MESSAGE_BYTES
from videomesh.errors import InvalidArgument, Unavailable
from videomesh.inference import InferenceThread
from videomesh.weights import load_into

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_BATCH = 16
WAN = "wan2.2"  # UMT5 from a Wan directory (the denoiser's `wan2.2` backend)


@dataclass(frozen=True)
class Encoded:
    states: torch.Tensor  # (B, L, D): float32 (default) or bf16 (Wan)
    mask: torch.Tensor  # (B, L) bool
    languages: list[str]
    notes: list[tuple[int, str, str]]  # (index, reason, message) for the caller to tell the user


@dataclass(frozen=True)
class EncoderSettings:
    model: str = "default"
    weights: Path | None = None  # default: services/encoder/weights/<model>.safetensors
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = -1  # Prometheus /metrics on host:port; -1 = off, 0 = a free port
    threads: int = 0  # torch intra-op threads; 0 = the cores this process may use
    model_dir: Path | None = None  # model wan2.2: the Wan directory (tokenizer/, text_encoder/)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda: where UMT5 runs (the default model: CPU)
    # The largest message the server sends or accepts; 0 = 4 MiB (codec.MAX_MESSAGE_BYTES) for the
    # default model, 32 MiB (codec.TEXT_MESSAGE_BYTES) for wan2.2, whose reply for a prompt and its
    # negative is 2 x 512 x 4096 bf16 = 8 MiB.
    max_message_bytes: int = 0

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.model == WAN:
            from videomesh.model_dir import WanModelDir

            if self.model_dir is None:
                raise ValueError(
                    "model wan2.2 needs model_dir: the downloaded Wan directory (--model-dir DIR or "
                    "VIDEOMESH_ENCODER_MODEL_DIR), e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers"
                )
            # a ModelDirError names the missing file and what was expected
            WanModelDir.open(self.model_dir).require("tokenizer", "text_encoder")
        elif self.model not in TEXT_ENCODERS:
            raise ValueError(
                f"unknown encoder model {self.model!r}; choose one of {sorted([*TEXT_ENCODERS, WAN])}"
            )
        if self.max_message_bytes < 0:
            raise ValueError(
                f"max_message_bytes must be 0 (automatic) or positive; got {self.max_message_bytes}"
            )

    @property
    def message_limit(self) -> int:
        return self.max_message_bytes or (TEXT_MESSAGE_BYTES if self.model == WAN else MAX_MESSAGE_BYTES)


class TextEncoding:
    """Thread-safe wrapper around TextEncoder for the service: the model loads and runs on one
    long-lived inference thread (videomesh/inference.py), whichever gRPC thread asks."""

    def __init__(self, settings: EncoderSettings):
        self.settings = settings
        self._worker = InferenceThread("encoder", settings.threads)
        self.model = None  # TextEncoder (default) or UMT5TextEncoder (wan2.2)
        self.name = ""

    @property
    def wan(self) -> bool:
        return self.settings.model == WAN

    def load(self) -> None:
        self._worker.call(self._load)

    def close(self) -> None:
        self._worker.close()

    def _load(self) -> None:
        if self.wan:
            from services.encoder.umt5 import UMT5TextEncoder

            # bf16 as WanPipeline.from_pretrained(..., torch_dtype=bfloat16) loads it; the name is the
            # identity the denoiser publishes as ModelInfo.encoder_model (WanModelDir.identity)
            # UMT5-XXL on the CPU is slow (and emulated bf16 without AMX-BF16): on CUDA when present
            device = self.settings.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model = UMT5TextEncoder.from_dir(self.settings.model_dir, dtype=torch.bfloat16, device=device)
            model.encode([""])  # warm up before SERVING
            self.model = model
            self.name = model.name
            return
        torch.manual_seed(0)  # untrained weights are the same on every replica
        model = TextEncoder(TEXT_ENCODERS[self.settings.model]).eval()
        path = self.settings.weights or WEIGHTS_DIR / f"{self.settings.model}.safetensors"
        version = load_into(model, path)
        model.encode([""])  # warm up (and load MiniLM, where fused) before SERVING
        self.model = model
        self.name = f"{self.settings.model}@{version}"

    def max_batch(self) -> int:
        """Texts per call: MAX_BATCH, and (Wan) as many 512-token states as fit in one reply."""
        if not self.wan or self.model is None:
            return MAX_BATCH
        per_text = self.model.max_length * (self.model.dim * 2 + 1)  # bf16 states + bool mask
        return max(1, min(MAX_BATCH, (self.settings.message_limit - 64 * 1024) // per_text))

    def encode(self, texts: list[str]) -> Encoded:
        if self.model is None:
            raise Unavailable("the encoder is still loading its model; retry shortly", retry_after=2.0)
        if not texts:
            raise InvalidArgument("texts: give at least one text", field="texts")
        limit = self.max_batch()
        if len(texts) > limit:
            raise InvalidArgument(f"texts: at most {limit} texts per call; got {len(texts)}", field="texts")
        for i, t in enumerate(texts):
            if len(t) > MAX_PROMPT_CHARS:
                raise InvalidArgument(
                    f"texts[{i}]: {len(t)} characters; the limit is {MAX_PROMPT_CHARS}", field=f"texts[{i}]"
                )
        langs = [detect_language(t) for t in texts]
        if self.wan:
            out = self._worker.call(self.model.encode, texts)  # calls run one at a time on the thread
            notes = [
                (i, "PROMPT_TRUNCATED", truncation_note(lost + self.model.max_length, self.model.max_length))
                for i, lost in enumerate(out.truncated)
                if lost
            ]
            return Encoded(out.states, out.mask, langs, notes)
        states, mask = self._worker.call(self._encode_default, texts)
        # the default model draws a world of shapes; Wan draws anything, so it gets no such note
        return Encoded(states, mask, langs, world_notes(texts))

    def _encode_default(self, texts: list[str]):
        with torch.inference_mode():
            return self.model.encode(texts)


def truncation_note(tokens: int, max_length: int) -> str:
    """What the user reads when a text is cut as WanPipeline cuts it (truncation, not refusal)."""
    return (
        f"the prompt has {tokens} tokens; the model reads the first {max_length} "
        "(the rest is cut, as Wan's own pipeline does)"
    )


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
