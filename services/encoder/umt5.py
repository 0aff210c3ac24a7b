"""UMT5 text encoding for the Wan backend, prepared exactly as diffusers' WanPipeline prepares text.

WanPipeline._get_t5_prompt_embeds (diffusers 0.42), step by step:
- prompt_clean: ftfy.fix_text, html.unescape twice, strip, whitespace runs -> one space;
- the tokenizer pads to max_sequence_length (512), truncates longer texts, appends </s>;
- UMT5 runs on the padded ids with their attention mask, in the encoder's own dtype;
- the states are cut to each text's real length and zero-padded to exactly 512 tokens (the DiT
  has no text mask: padding to the batch's longest text instead changes the output);
- a missing negative prompt is encoded as "".
Each text runs through UMT5 on its own, as the pipeline runs the prompt and the negative prompt,
so the states do not depend on what else is in the call.

ftfy is required (the `wan` extra installs it): diffusers cleans with ftfy only when it is
installed, so without it the same prompt would give other tokens than the reference and Wan's
own code, which both clean with ftfy. Texts over 512 tokens are truncated as WanPipeline does;
`UMT5Encoding.truncated` says how many tokens each text lost, for a warning in the job's events.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

from videomesh.model_dir import ModelDirError, WanModelDir

MAX_SEQUENCE_LENGTH = 512


def _ftfy():
    try:
        import ftfy
    except ImportError:
        raise ImportError(
            "the Wan text encoder needs ftfy to clean prompts as WanPipeline does: pip install -e '.[wan]'"
        ) from None
    return ftfy


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt_clean with ftfy (basic_clean, then whitespace_clean)."""
    import regex  # diffusers cleans with `regex`, whose \\s differs from `re`'s on a few code points

    text = html.unescape(html.unescape(_ftfy().fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


@dataclass
class UMT5Encoding:
    states: torch.Tensor  # (B, max_length, D) in the encoder's dtype, zero after each text's tokens
    mask: torch.Tensor  # (B, max_length) bool: the real tokens (the Wan DiT does not read it)
    lengths: list[int]  # real tokens per text, </s> included
    truncated: list[int]  # tokens cut from each text to fit max_length (0 = none)


class UMT5TextEncoder:
    """The tokenizer and UMT5 encoder of a Wan directory. Not thread-safe: callers serialise encode()."""

    def __init__(self, tokenizer, model, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH, name: str = ""):
        _ftfy()
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = max_sequence_length
        self.name = name

    @classmethod
    def from_dir(
        cls, path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> UMT5TextEncoder:
        """Load tokenizer/ and text_encoder/ of a diffusers-layout Wan directory, as WanPipeline.from_pretrained
        (..., torch_dtype=dtype) does: the classes model_index.json names, UMT5 in `dtype` (its
        _keep_in_fp32_modules stay fp32)."""
        import transformers

        d = WanModelDir.open(path)
        d.require("tokenizer", "text_encoder")
        tok_cls = getattr(transformers, d.class_name("tokenizer"), None) or transformers.AutoTokenizer
        enc_cls = getattr(transformers, d.class_name("text_encoder"))
        try:
            tokenizer = tok_cls.from_pretrained(d.path / "tokenizer")
            model = enc_cls.from_pretrained(d.path / "text_encoder", dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{d.path}: could not load the text encoder: {e}") from e
        name = f"umt5@{d.identity('tokenizer', 'text_encoder')}"
        return cls(tokenizer, model.to(device), name=name)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def count_tokens(self, text: str) -> int:
        """Tokens of a text after cleaning, </s> included, before any truncation."""
        return len(self.tokenizer(prompt_clean(text), add_special_tokens=True).input_ids)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> UMT5Encoding:
        states, masks, lengths, truncated = [], [], [], []
        device = self.model.device
        for text in texts:
            clean = prompt_clean(text or "")
            inputs = self.tokenizer(
                [clean],
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            ids, mask = inputs.input_ids, inputs.attention_mask
            n = int(mask.gt(0).sum(dim=1)[0])
            out = self.model(ids.to(device), mask.to(device)).last_hidden_state.to(dtype=self.model.dtype)
            u = out[0, :n]  # (n, D): the real tokens; the rest is zeros, not UMT5's states of <pad>
            states.append(torch.cat([u, u.new_zeros(self.max_length - n, u.size(1))]))
            m = torch.zeros(self.max_length, dtype=torch.bool)
            m[:n] = True
            masks.append(m)
            lengths.append(n)
            truncated.append(max(0, self.count_tokens(text or "") - self.max_length))
        return UMT5Encoding(torch.stack(states), torch.stack(masks), lengths, truncated)
