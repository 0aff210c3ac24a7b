"""The spatiotemporal mixture-of-experts U-Net of the embedded default model.

Layout follows Wan2.2-A14B at toy scale: two experts with the same architecture, a
high-noise expert for the early (t >= boundary) steps that lays out the scene and the
motion, and a low-noise expert for the late steps that refines detail. Each expert is a
U-Net over (B, T, C, H, W) pixel frames with factorised spatial and temporal layers.

Two conditioning paths are there for motion, the hard part of text-to-video at this scale:
- a per-frame embedding (frame position ⊕ pooled text → MLP) modulates every ResBlock per
  frame, so "moving left" can change what frame t looks like, not just the whole clip;
- coordinate channels on the input, so convolutions can tie that modulation to a place
  in the frame (where the object should be at time t);
- trajectory-aligned temporal layers: a head reads a clip-level motion vector from the
  pooled text (a classifier over MOTION_CLASSES whose probabilities weight their vectors),
  and every temporal convolution and temporal attention works on frames
  shifted back along that trajectory (frame t by -v * (t/(T-1) - 1/2)), then shifts its
  output forward again. Along the trajectory a moving object is still, which the temporal
  layers already model well, so "moves right" becomes "still, in coordinates that move
  right". The head is trained from the clips' motion (an auxiliary loss in the aligned phase,
  services/denoiser/train.py); at zero (its initialisation) the layers are plain temporal ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    channels: int = 3  # pixel space, RGB in [-1, 1]
    patch: int = 1  # p x p pixels -> one position (pixel-unshuffle): 4x less spatial work at p=2
    base: int = 64
    mults: tuple[int, ...] = (1, 2, 2)
    attn: tuple[bool, ...] = (False, True, True)  # spatial/temporal/cross attention per level
    heads: int = 4
    text_dim: int = 128
    emb_dim: int = 256
    max_frames: int = 32
    align: bool = True  # trajectory-aligned temporal layers (a motion-vector head on the text)


@dataclass(frozen=True)
class ModelConfig:
    """One entry of the MODELS registry: the experts, what they generate, how to sample."""

    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: str = "default"  # key into services.encoder.model.TEXT_ENCODERS
    frames: int = 16
    height: int = 32
    width: int = 32
    fps: float = 4.0
    boundary: float = 0.875  # t >= boundary -> high-noise expert (Wan2.2 T2V uses 0.875)
    steps: int = 20
    shift: float = 1.0
    guidance_high: float = 5.0
    # 2, not 4: on the low-noise steps stronger guidance bends the outline (in-process, 24
    # held-out prompts per language, shape 39 / 65 / 75 / 76 / 72% at 6 / 4 / 2 / 1.5 / 1)
    guidance_low: float = 2.0
    max_steps: int = 100
    languages: tuple[str, ...] = ("en", "zh", "ja")

    def expert_for(self, t: float) -> str:
        """Which expert runs the step at time t (routing needs no weights)."""
        return "high_noise" if t >= self.boundary else "low_noise"

    def guidance_for(self, expert: str) -> float:
        return self.guidance_high if expert == "high_noise" else self.guidance_low


MODELS = {
    "tiny": ModelConfig(
        name="tiny",
        unet=UNetConfig(
            base=16, mults=(1, 2), attn=(False, True), heads=2, text_dim=32, emb_dim=32, max_frames=8
        ),
        encoder="tiny",
        frames=4,
        height=16,
        width=16,
        steps=4,
    ),
    # patch 2 measured at 0.8 s per training step (batch 16) vs 9 s at patch 1, same parameters
    # shift 3 (as Wan2.2 samples with a shift): 7 of 20 steps with the high-noise expert instead
    # of 3; in-process, 16 held-out prompts per language, motion 69/75/94% -> 81/81/94% (en/zh/ja)
    "default": ModelConfig(
        name="default",
        unet=UNetConfig(patch=2, base=64, mults=(1, 2, 2), attn=(False, True, True)),
        shift=3.0,
    ),
}


# The motions the aligned temporal layers know, as net displacement over a clip in [-1, 1]
# frame units (x right, y down): the world's mean travel is half the frame side, 1.0 here.
# "still" first; the four directions cancel, so a uniform (untrained) head gives zero.
MOTION_CLASSES: dict[str, tuple[float, float]] = {
    "still": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to 0..1000 as in DiT): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _bilinear_shift_matrix(offset: torch.Tensor, size: int) -> torch.Tensor:
    """(N,) offsets in pixels -> (N, size, size) A with (A @ v)[j] = v sampled at j + offset,
    linear between neighbours, the position clamped to the row (borders repeat the edge)."""
    idx = torch.arange(size, device=offset.device, dtype=torch.float32)
    pos = (idx[None, :] + offset[:, None]).clamp(0, size - 1)  # (N, size): where output j reads
    return (1 - (idx[None, None, :] - pos[:, :, None]).abs()).clamp(min=0)


def shift_frames(x: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """Sample frame i of x (N, C, H, W) at p + d[i] (d: (N, 2) as (x, y) in [-1, 1] units, the
    frame's full width and height being 2): content moves by -d. Borders repeat the edge.

    What F.grid_sample (bilinear, border padding, align_corners=False) computes on a
    translation grid, as two batched matrix products A_y @ x @ A_x^T in x's dtype (a pure
    translation is separable). On CPU grid_sample runs in fp32 only and its backward was ~18%
    of a training step; in bf16 these products take a third of its time.
    """
    if d is None:
        return x
    n, c, h, w = x.shape
    d = d.float()
    ax = _bilinear_shift_matrix(d[:, 0] * (w / 2), w).to(x.dtype)  # (N, W, W)
    ay = _bilinear_shift_matrix(d[:, 1] * (h / 2), h).to(x.dtype)  # (N, H, H)
    y = torch.bmm(x.reshape(n, c * h, w), ax.transpose(1, 2))  # along the rows: (N, C*H, W)
    y = y.reshape(n, c, h, w).transpose(2, 3).reshape(n, c * w, h)
    y = torch.bmm(y, ay.transpose(1, 2))  # along the columns: (N, C*W, H)
    return y.reshape(n, c, w, h).transpose(2, 3).contiguous()


def _groups(c: int) -> int:
    return min(32, c // 4) if c >= 8 else 1


class ResBlock(nn.Module):
    """Spatial 3x3 convs per frame, per-frame FiLM, then a temporal conv across frames."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.tnorm = nn.GroupNorm(_groups(cout), cout)
        self.tconv = nn.Conv1d(cout, cout, 3, padding=1)
        # zero-init so each block starts as identity-plus-spatial; temporal mixing is learned
        nn.init.zeros_(self.tconv.weight)
        nn.init.zeros_(self.tconv.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, frames: int, track: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B*T, C, H, W); emb: (B*T, E); track: (B*T, 2) trajectory offsets or None
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=-1)
        h = self.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv2(F.silu(h))
        bt, c, hh, ww = h.shape
        # (B*T, C, H, W) -> (B*H*W, C, T), along the trajectory
        t = (
            self.tnorm(shift_frames(h, track))
            .reshape(bt // frames, frames, c, hh, ww)
            .permute(0, 3, 4, 2, 1)
            .reshape(-1, c, frames)
        )
        t = self.tconv(F.silu(t))
        # (B*H*W, C, T) -> (B*T, C, H, W)
        t = t.reshape(bt // frames, hh, ww, c, frames).permute(0, 4, 3, 1, 2).reshape(bt, c, hh, ww)
        return self.skip(x) + h + shift_frames(t, None if track is None else -track)


ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "matmul")
_attention = "sdpa"  # what long CUDA sequences use; set_attention() chooses it at load time


def set_attention(name: str) -> str:
    """Choose the kernel for long attention sequences on CUDA; returns the one in effect.

    "auto": xFormers' memory-efficient kernel where the package imports, else torch SDPA;
    "xformers" requires the package (pip install 'videomesh[gpu]'); "sdpa"; "matmul" (plain
    batched matmuls everywhere). CPU tensors always take plain matmuls (see `_attend`)."""
    global _attention
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    if name in ("auto", "xformers"):
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            if name == "xformers":
                raise RuntimeError(f"attention=xformers, but xformers does not import: {e}") from e
            name = "sdpa"
        else:
            name = "xformers"
    _attention = name
    return name


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """(N, Lq, C), (N, Lk, C) -> (N, Lq, C), multi-head.

    Plain batched matmuls rather than F.scaled_dot_product_attention: the sequences here are
    short (16 frames, 64 positions, ~40 tokens) and many, where the CPU flash kernel's
    backward is ~4x slower than two bf16 GEMMs. Long sequences on CUDA go to the kernel
    `set_attention` chose: xFormers (unmasked: the spatial attention) or SDPA.
    """
    n, lq, c = q.shape
    lk = k.shape[1]
    long_cuda = q.is_cuda and lq * lk >= 4096 and _attention != "matmul"
    if long_cuda and _attention == "xformers" and mask is None:
        import xformers.ops as xops

        # xFormers takes (N, L, heads, C/heads) as it is: no transposes
        out = xops.memory_efficient_attention(
            q.reshape(n, lq, heads, c // heads),
            k.reshape(n, lk, heads, c // heads),
            v.reshape(n, lk, heads, c // heads),
        )
        return out.reshape(n, lq, c)
    q = q.reshape(n, lq, heads, c // heads).transpose(1, 2)
    k = k.reshape(n, lk, heads, c // heads).transpose(1, 2)
    v = v.reshape(n, lk, heads, c // heads).transpose(1, 2)
    if long_cuda:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        w = (q @ k.transpose(-1, -2)) * (c // heads) ** -0.5  # (N, heads, Lq, Lk)
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))
        out = w.softmax(-1).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(n, lq, c)


class SpatialAttention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(c), c)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bt, c, h, w = x.shape
        s = self.norm(x).flatten(2).transpose(1, 2)  # (B*T, C, H, W) -> (B*T, H*W, C)
        q, k, v = self.qkv(s).chunk(3, dim=-1)
        o = self.out(_attend(q, k, v, self.heads))
        return x + o.transpose(1, 2).reshape(bt, c, h, w)


class TemporalAttention(nn.Module):
    """Attention across frames at each pixel, with learned frame positions."""

    def __init__(self, c: int, heads: int, max_frames: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(c), c)
        self.pos = nn.Parameter(torch.zeros(max_frames, c))
        nn.init.normal_(self.pos, std=0.02)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, frames: int, track: torch.Tensor | None = None) -> torch.Tensor:
        bt, c, h, w = x.shape
        # (B*T, C, H, W) -> (B*H*W, T, C), along the trajectory
        s = (
            self.norm(shift_frames(x, track))
            .reshape(bt // frames, frames, c, h, w)
            .permute(0, 3, 4, 1, 2)
            .reshape(-1, frames, c)
        )
        s = s + self.pos[:frames]
        q, k, v = self.qkv(s).chunk(3, dim=-1)
        o = self.out(_attend(q, k, v, self.heads))
        # (B*H*W, T, C) -> (B*T, C, H, W)
        o = o.reshape(bt // frames, h, w, frames, c).permute(0, 3, 4, 1, 2).reshape(bt, c, h, w)
        return x + shift_frames(o, None if track is None else -track)


class CrossAttention(nn.Module):
    """Pixels attend to the text tokens (the same tokens for every frame)."""

    def __init__(self, c: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(c), c)
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(text_dim, 2 * c)
        self.out = nn.Linear(c, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, frames: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))  # (B*T, H*W, C)
        k, v = self.kv(text).chunk(2, dim=-1)  # (B, L, C)
        k = k.repeat_interleave(frames, dim=0)  # (B*T, L, C)
        v = v.repeat_interleave(frames, dim=0)
        m = mask.repeat_interleave(frames, dim=0)[:, None, None, :]  # (B*T, 1, 1, L)
        o = self.out(_attend(q, k, v, self.heads, m))
        return x + o.transpose(1, 2).reshape(bt, c, h, w)


class Level(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig, attn: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, cfg.emb_dim)
        self.attn = attn
        if attn:
            self.spatial = SpatialAttention(cout, cfg.heads)
            self.temporal = TemporalAttention(cout, cfg.heads, cfg.max_frames)
            self.cross = CrossAttention(cout, cfg.text_dim, cfg.heads)

    def forward(self, x, emb, text, mask, frames, track=None):
        x = self.res(x, emb, frames, track)
        if self.attn:
            x = self.spatial(x)
            x = self.temporal(x, frames, track)
            x = self.cross(x, text, mask, frames)
        return x


class UNet(nn.Module):
    """One expert: velocity prediction v(x_t, t, text) over (B, T, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base * m for m in cfg.mults]
        e = cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.text_proj = nn.Linear(cfg.text_dim, e)
        self.frame_pos = nn.Parameter(torch.zeros(cfg.max_frames, e))
        nn.init.normal_(self.frame_pos, std=0.02)
        # frame position ⊕ pooled text -> per-frame modulation (the direct motion path)
        self.frame_mlp = nn.Sequential(nn.Linear(2 * e, e), nn.SiLU(), nn.Linear(e, e))
        # pooled text -> logits over MOTION_CLASSES -> the clip's motion vector (x, y), the
        # classes' vectors weighted by their probabilities. A classifier, not a regression to
        # the vectors: on held-out phrasings a linear regression head read "停在原地" (stays put)
        # as a third of a frame upwards; the softmax saturates (measured: MODEL_CARD.md).
        # Zero-init: an untrained head leaves the temporal layers plain.
        self.motion = nn.Linear(cfg.text_dim, len(MOTION_CLASSES)) if cfg.align else None
        if self.motion is not None:
            nn.init.zeros_(self.motion.weight)
            nn.init.zeros_(self.motion.bias)
        self.register_buffer("motion_vectors", torch.tensor(list(MOTION_CLASSES.values())), persistent=False)
        pc = cfg.channels * cfg.patch**2
        self.stem = nn.Conv2d(pc + 2, chans[0], 3, padding=1)  # +2 coordinate channels
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cin = chans[0]
        for i, c in enumerate(chans):
            self.down.append(Level(cin, c, cfg, cfg.attn[i]))
            self.downsample.append(
                nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(chans) - 1 else nn.Identity()
            )
            cin = c
        self.mid = Level(cin, cin, cfg, True)
        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            self.up.append(Level(cin + chans[i], chans[i], cfg, cfg.attn[i]))
            cin = chans[i]
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, pc, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def pool(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(text.dtype).unsqueeze(-1)
        return (text * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, L, D) -> (B, D)

    def motion_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled text -> (B, len(MOTION_CLASSES)) logits (the head must exist)."""
        return self.motion(pooled.float())

    def motion_vector(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """(B, D) pooled text -> (B, 2) motion vector, or None without the head."""
        if self.motion is None:
            return None
        return self.motion_logits(pooled).softmax(-1) @ self.motion_vectors

    def track(self, pooled: torch.Tensor, frames: int) -> torch.Tensor | None:
        """Per-frame offsets along the text's trajectory, (B*T, 2) centred on the middle frame;
        None when there is no head or it is untrained (all zero: plain temporal layers)."""
        if self.motion is None or not bool(
            torch.any(self.motion.weight != 0) or torch.any(self.motion.bias != 0)
        ):
            return None
        v = self.motion_vector(pooled)
        tau = torch.linspace(-0.5, 0.5, frames, device=v.device) if frames > 1 else v.new_zeros(1)
        return (v[:, None, :] * tau[None, :, None]).reshape(-1, 2)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, frames, c, h, w = x.shape
        if frames > self.cfg.max_frames:
            raise ValueError(f"at most {self.cfg.max_frames} frames; got {frames}")
        mult = self.cfg.patch * 2 ** (len(self.cfg.mults) - 1)
        if h % mult or w % mult:
            raise ValueError(f"height and width must be multiples of {mult}; got {h}x{w}")
        pooled = self.pool(text, mask)  # (B, D)
        track = self.track(pooled, frames)
        temb = self.time_mlp(timestep_embedding(t, self.cfg.emb_dim).to(x.dtype)) + self.text_proj(
            pooled
        )  # (B, E)
        fpos = self.frame_pos[:frames].unsqueeze(0).expand(b, -1, -1)  # (B, T, E)
        femb = self.frame_mlp(torch.cat([fpos, temb.unsqueeze(1).expand(-1, frames, -1)], dim=-1))
        emb = (temb.unsqueeze(1) + femb).reshape(b * frames, -1)  # (B*T, E)
        p = self.cfg.patch
        hp, wp = h // p, w // p
        ys = torch.linspace(-1, 1, hp, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, wp, device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b * frames, -1, -1, -1)
        # (B, T, C, H, W) -> (B*T, C*p*p, H/p, W/p)
        xin = (
            F.pixel_unshuffle(x.reshape(b * frames, c, h, w), p) if p > 1 else x.reshape(b * frames, c, h, w)
        )
        hcur = self.stem(torch.cat([xin, coords], dim=1))  # (B*T, C0, H/p, W/p)
        skips = []
        for level, ds in zip(self.down, self.downsample, strict=True):
            hcur = level(hcur, emb, text, mask, frames, track)
            skips.append(hcur)
            hcur = ds(hcur)
        hcur = self.mid(hcur, emb, text, mask, frames, track)
        for level in self.up:
            s = skips.pop()
            if hcur.shape[-2:] != s.shape[-2:]:
                hcur = F.interpolate(hcur, size=s.shape[-2:], mode="nearest")
            hcur = level(torch.cat([hcur, s], dim=1), emb, text, mask, frames, track)
        out = self.conv_out(F.silu(self.norm_out(hcur)))
        if p > 1:
            out = F.pixel_shuffle(out, p)  # (B*T, C*p*p, H/p, W/p) -> (B*T, C, H, W)
        return out.reshape(b, frames, c, h, w)


class MoEDenoiser(nn.Module):
    """Two experts split by timestep, as in Wan2.2-A14B: only one runs per step."""

    # How the model may be split for placement: each entry is one shard (see executors).
    _shard_modules = {"high_noise": "experts.high_noise", "low_noise": "experts.low_noise"}
    _no_split_modules = ("UNet",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleDict({"high_noise": UNet(cfg.unet), "low_noise": UNet(cfg.unet)})

    def expert_for(self, t: float) -> str:
        return self.cfg.expert_for(t)

    def guidance_for(self, expert: str) -> float:
        return self.cfg.guidance_for(expert)

    def forward(self, x, t, text, mask, expert: str | None = None) -> torch.Tensor:
        expert = expert or self.expert_for(float(t.flatten()[0]))
        return self.experts[expert](x, t, text, mask)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
