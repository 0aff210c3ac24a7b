"""Tiny random Wan pipelines in the diffusers layout, built offline, for the Wan backend tests.

The components follow diffusers' own Wan tests (tests/pipelines/wan/test_wan.py, test_wan_22.py):
2-layer WanTransformer3DModel experts with 2 heads of 12, a base_dim=3 AutoencoderKLWan, a
UniPC flow-matching scheduler. diffusers downloads "hf-internal-testing/tiny-random-t5" for the
text side; here a tiny UMT5 encoder and a T5Tokenizer over a tiny Unigram vocabulary (T5's layout:
<pad>=0, </s>=1, <unk>=2, "▁" word starts, "</s>" appended) are built in code, so nothing touches
the network.

`save_tiny_wan(path, layout)` writes model_index.json, transformer/, [transformer_2/], vae/,
text_encoder/, tokenizer/, scheduler/ with `WanPipeline.save_pretrained`, exactly what a
downloaded Wan-AI/*-Diffusers directory looks like, so everything loads through the
production path.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

LAYOUTS = ("a14b", "t2v", "ti2v5b")  # Wan2.2 T2V-A14B (two experts), Wan2.1 T2V (one), Wan2.2 TI2V-5B
TEXT_DIM = 32

# A few whole words so English prompts are not all single characters; the rest is characters:
# ASCII, hiragana, katakana and the first CJK ideographs (enough for the zh/ja test prompts).
_WORDS = (
    "a cat dog red blue ball box moving left right up down on the of and with in at slowly fast "
    "dance monkey negative background white black street night rain city"
).split()
_CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 600)] + list("猫狗球红蓝色的在上下左右移动跳舞街道夜晚雨城市")
_KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]


def tiny_tokenizer():
    """A UMT5-like tokenizer built in code: transformers' T5Tokenizer (a Unigram model) on a tiny vocab."""
    from transformers import T5Tokenizer

    chars = list(
        dict.fromkeys(list(string.ascii_letters + string.digits + string.punctuation) + _CJK + _KANA)
    )
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in _WORDS]
    vocab += [(f"▁{c}", -6.0) for c in string.ascii_letters + string.digits]
    vocab += [(c, -8.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg).eval()


def _transformer(channels: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _vae(layout: str):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if layout == "ti2v5b":
        # Wan2.2's VAE: 48 latent channels, a residual down/up path, 2x2 pixel patches -> stride 4x16x16.
        # Non-trivial mean/std so the de-normalisation is exercised.
        g = torch.Generator().manual_seed(1)
        return AutoencoderKLWan(
            base_dim=3,
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=(torch.randn(48, generator=g) * 0.5).tolist(),
            latents_std=(torch.rand(48, generator=g) + 0.5).tolist(),
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            temperal_downsample=[False, True, True],
        )
    return AutoencoderKLWan(  # Wan2.1's VAE (also A14B's): 16 channels, stride 4x8x8, its real mean/std
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_pipeline(layout: str = "a14b"):
    """A WanPipeline of tiny random components in one of LAYOUTS."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer))
    channels = 48 if layout == "ti2v5b" else 16
    if layout == "t2v":
        # Wan2.1's diffusers tests sample with flow-matching Euler; the others with UniPC (multistep, stateful)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    else:
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(layout),
        scheduler=scheduler,
        transformer=_transformer(channels, seed=0),
        transformer_2=_transformer(channels, seed=1) if layout == "a14b" else None,
        boundary_ratio=0.875 if layout == "a14b" else None,
        expand_timesteps=layout == "ti2v5b",
    )


def save_tiny_wan(path: str | Path, layout: str = "a14b") -> Path:
    """Write a tiny Wan pipeline in the diffusers layout to `path`; return the path."""
    path = Path(path)
    tiny_pipeline(layout).save_pretrained(path)
    return path


# diffusers module path -> the original Wan / lightx2v name, per block and for the head
_LIGHTX2V = {
    **{
        f"attn1.{c}": f"self_attn.{o}"
        for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)
    },
    **{
        f"attn2.{c}": f"cross_attn.{o}"
        for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)
    },
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def save_tiny_lora(
    path: str | Path,
    transformer,
    *,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.3,
    style: str = "diffusers",
    blocks: tuple[int, ...] | None = None,
    metadata: dict | None = None,
) -> Path:
    """A random LoRA for a (tiny) WanTransformer3DModel, written as safetensors; returns the path.

    style "diffusers": `transformer.blocks.N.attn1.to_q.lora_A.weight` / `lora_B.weight` (fp32), for every
    attention projection and FFN layer of the blocks and for proj_out. style "lightx2v": the original
    Wan keys lightx2v / kohya ship (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up`, an
    `alpha` per layer, `diff_b` bias deltas, zero `norm_*.diff` keys, `head.head`), in bf16."""
    from safetensors.torch import save_file

    if style not in ("diffusers", "lightx2v"):
        raise ValueError(f"style must be diffusers or lightx2v; got {style!r}")
    g = torch.Generator().manual_seed(seed)
    n_blocks = len(transformer.blocks)
    tensors: dict[str, torch.Tensor] = {}

    def pair(mod):
        down = torch.randn(rank, mod.in_features, generator=g) * std
        up = torch.randn(mod.out_features, rank, generator=g) * std
        return down, up

    for i in blocks if blocks is not None else range(n_blocks):
        for ours, theirs in _LIGHTX2V.items():
            mod = transformer.get_submodule(f"blocks.{i}.{ours}")
            down, up = pair(mod)
            if style == "diffusers":
                tensors[f"transformer.blocks.{i}.{ours}.lora_A.weight"] = down
                tensors[f"transformer.blocks.{i}.{ours}.lora_B.weight"] = up
            else:
                key = f"diffusion_model.blocks.{i}.{theirs}"
                tensors[f"{key}.lora_down.weight"] = down.bfloat16()
                tensors[f"{key}.lora_up.weight"] = up.bfloat16()
                tensors[f"{key}.alpha"] = torch.tensor(float(rank * 2), dtype=torch.bfloat16)
                tensors[f"{key}.diff_b"] = (torch.randn(mod.out_features, generator=g) * std * 0.1).bfloat16()
        if style == "lightx2v":
            dim = transformer.blocks[i].attn1.norm_q.weight.shape[0]
            tensors[f"diffusion_model.blocks.{i}.self_attn.norm_q.diff"] = torch.zeros(
                dim, dtype=torch.bfloat16
            )
    down, up = pair(transformer.proj_out)
    if style == "diffusers":
        tensors["transformer.proj_out.lora_A.weight"] = down
        tensors["transformer.proj_out.lora_B.weight"] = up
    else:
        tensors["diffusion_model.head.head.lora_down.weight"] = down.bfloat16()
        tensors["diffusion_model.head.head.lora_up.weight"] = up.bfloat16()
        tensors["diffusion_model.head.head.diff_b"] = (
            torch.randn(up.shape[0], generator=g) * std * 0.1
        ).bfloat16()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
