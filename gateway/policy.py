"""The gateway's spec policy: a request normalised, validated and planned from the settings, the tier
and the model's published rules, with no I/O of its own (unit-testable without a live denoiser).

`ModelRules` holds the denoiser's ModelInfo (what the model generates, its adapters) and re-reads it at
most every `model_refresh_seconds`; `SpecPolicy` turns a user's VideoSpec into a normalised one
(`normalize`: errors name the field and the allowed values), a Plan for the pipeline (`plan`, `plan_for`),
the marks a job carries (`marks`) and the result-cache key (`cache_key`). The gateway (gateway.py)
owns admission, the cache and the job runner around it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from gateway.jobs import Job
from gateway.pipeline import Plan
from gateway.rules import NativeLimits, normalize_native, output_frames, rule_driven
from gateway.tenants import Tenant
from gateway.tiers import TierPolicy
from gateway.watermark import TOTAL_BITS
from services.denoiser.backends.base import MAX_STEP_CACHE
from services.encoder.model import MAX_PROMPT_CHARS
from services.upscaler.upscaler import MAX_OUTPUT_FRAMES
from services.upscaler.upscaler import MAX_SIDE as UPSCALER_MAX_SIDE
from videomesh.adapters import owner as lora_owner
from videomesh.errors import InvalidArgument, Unavailable, VideomeshError
from videomesh.v1 import common_pb2, denoiser_pb2, gateway_pb2

if TYPE_CHECKING:
    from gateway.gateway import GatewaySettings
    from gateway.templates import TemplateLibrary

log = logging.getLogger("videomesh.gateway")

MOTION_WORDS = (
    "move", "moving", "moves", "roll", "slide", "drift", "travel", "head", "go", "bounce", "grow", "shrink", "jog",
    "run", "walk", "fly", "rise", "fall", "climb", "sink", "动", "移", "滚", "飞", "跑", "走", "升", "降", "動", "転", "飛",
)  # fmt: skip
# Checked before MOTION_WORDS: "not moving", "没有移动" and "微動だにしない" contain motion words.
STILL_WORDS = (
    "still", "static", "motionless", "stationary", "not move", "not moving", "without moving", "stays put",
    "staying put", "in place", "at rest", "静止", "不动", "没有移动", "不移动", "停在", "原地", "不動", "止ま",
    "動かない", "動いていない", "じっと", "微動だにしない",
)  # fmt: skip


def _size(s: str) -> tuple[int, int]:
    w, _, h = s.partition("x")
    return int(w), int(h)


def expects_motion(prompt: str) -> bool:
    p = prompt.lower()
    if any(w in p for w in STILL_WORDS):
        return False
    return any(w in p for w in MOTION_WORDS)


class ModelRules:
    """The denoiser's ModelInfo: set at the gateway's start (`info`), re-read by `refresh()` at most
    every `refresh_seconds` (new adapters); a failed read keeps the old one."""

    def __init__(self, fetch: Callable[[], denoiser_pb2.ModelInfo], refresh_seconds: float):
        self.fetch = fetch
        self.refresh_seconds = refresh_seconds
        self.info: denoiser_pb2.ModelInfo | None = None
        self.read_at = 0.0  # monotonic time of the last read

    def set(self, info: denoiser_pb2.ModelInfo) -> None:
        self.info = info
        self.read_at = time.monotonic()

    def refresh(self) -> None:
        if time.monotonic() - self.read_at < self.refresh_seconds:
            return
        self.read_at = time.monotonic()
        try:
            self.info = self.fetch()
        except grpc.RpcError as err:
            log.warning("could not refresh the denoiser's model info: %s", err.details())


class SpecPolicy:
    def __init__(self, settings: GatewaySettings, tiers: dict[str, TierPolicy], templates: TemplateLibrary,
                 rules: ModelRules):  # fmt: skip
        self.settings = settings
        self.tiers = tiers
        self.templates = templates
        self.rules = rules

    def policy(self, tier: str) -> TierPolicy:
        return self.tiers.get(tier, self.tiers["free"])

    def normalize(self, spec: common_pb2.VideoSpec, policy: TierPolicy | None = None,
                  tenant: str = "") -> common_pb2.VideoSpec:  # fmt: skip
        """Validate a user spec and fill defaults. Errors name the field and the allowed values."""
        m = self.rules.info
        if m is None:
            raise Unavailable("the gateway is still starting", retry_after=1.0)
        s = self.settings
        sizes = [z for z in s.sizes if not policy or not policy.sizes or z in policy.sizes]
        out = common_pb2.VideoSpec()
        out.CopyFrom(spec)
        violations = []
        prompt = spec.prompt.strip()
        if not prompt:
            violations.append(("spec.prompt", "prompt is empty; describe the video you want"))
        elif len(spec.prompt) > MAX_PROMPT_CHARS:
            violations.append(
                ("spec.prompt", f"prompt has {len(spec.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
            )
        if len(spec.negative_prompt) > MAX_PROMPT_CHARS:
            violations.append(
                ("spec.negative_prompt", f"negative prompt longer than {MAX_PROMPT_CHARS} characters")
            )
        if len(spec.style) > 100:
            violations.append(("spec.style", "style is longer than 100 characters"))
        if spec.HasField("image"):
            violations.append(("spec.image", "image: image-to-video is not served yet; this model runs text-to-video "
                                             "(leave image unset)"))  # fmt: skip
        if rule_driven(
            m
        ):  # e.g. wan2.2: the backend's published rules, nothing hard-coded (gateway/rules.py)
            limits = NativeLimits(s.interpolated_fps, MAX_OUTPUT_FRAMES, UPSCALER_MAX_SIDE)
            normalize_native(spec, out, m, limits, policy, violations)
        else:  # the default model: the gateway's size and fps lists, its fixed clip length
            if spec.width < 0 or spec.height < 0:
                violations.append(("spec.width", f"size must be positive; got {spec.width}x{spec.height}"))
            elif spec.width or spec.height:
                if f"{spec.width}x{spec.height}" not in sizes:
                    plan = f" on the {policy.name} tier" if policy and policy.sizes else ""
                    violations.append(
                        (
                            "spec.width",
                            f"size {spec.width}x{spec.height} is not offered{plan}; choose one of {', '.join(sizes)}",
                        )
                    )
            else:
                out.width, out.height = _size(s.default_size if s.default_size in sizes else sizes[0])
            if spec.fps < 0 or not math.isfinite(spec.fps):
                violations.append(("spec.fps", f"fps must be positive; got {spec.fps}"))
            elif spec.fps and spec.fps not in s.fps_choices:
                violations.append(
                    (
                        "spec.fps",
                        f"fps {spec.fps:g} is not offered; choose one of {', '.join(f'{f:g}' for f in s.fps_choices)}",
                    )
                )
            elif not spec.fps:
                out.fps = s.default_fps
            model_duration = m.frame_counts[0] / m.fps
            if spec.duration_seconds < 0 or not math.isfinite(spec.duration_seconds):
                violations.append(
                    ("spec.duration_seconds", f"duration must be positive; got {spec.duration_seconds}")
                )
            elif spec.duration_seconds and abs(spec.duration_seconds - model_duration) > 1e-3:
                allowed = ", ".join(f"{c / m.fps:g}" for c in m.frame_counts)
                violations.append(
                    (
                        "spec.duration_seconds",
                        f"duration {spec.duration_seconds:g}s is not offered by model {m.name}; allowed: {allowed} s",
                    )
                )
            else:
                out.duration_seconds = model_duration
                if policy and policy.max_duration and model_duration > policy.max_duration:
                    violations.append(
                        (
                            "spec.duration_seconds",
                            f"the {policy.name} tier allows clips up to {policy.max_duration:g} s",
                        )
                    )
            if spec.num_frames < 0 or (spec.num_frames and spec.num_frames not in m.frame_counts):
                counts = " or ".join(str(c) for c in m.frame_counts)
                violations.append(("spec.num_frames", f"num_frames: model {m.name} generates {counts} frames; got "
                                                      f"{spec.num_frames} (0 = the default)"))  # fmt: skip
            if not (0 <= spec.guidance_scale_2 <= 30) or not math.isfinite(spec.guidance_scale_2):
                violations.append(("spec.guidance_scale_2",
                                   f"guidance_scale_2 must be in 0..30 (0 = guidance_scale); got {spec.guidance_scale_2}"))  # fmt: skip
            if policy and policy.max_pixels and out.width * out.height > policy.max_pixels:
                violations.append(("spec.width", f"size {out.width}x{out.height} has {out.width * out.height} pixels per "
                                                 f"frame; the {policy.name} tier allows up to {policy.max_pixels}"))  # fmt: skip
            if policy and policy.max_frames and m.frame_counts and m.frame_counts[0] > policy.max_frames:
                violations.append(("spec.num_frames", f"model {m.name} generates {m.frame_counts[0]} frames per clip; the "
                                                      f"{policy.name} tier allows {policy.max_frames}"))  # fmt: skip
        if spec.num_steps < 0 or spec.num_steps > m.max_steps:
            violations.append(
                (
                    "spec.num_steps",
                    f"num_steps must be in 1..{m.max_steps} (0 = default {m.default_steps}); got {spec.num_steps}",
                )
            )
        elif not spec.num_steps:
            out.num_steps = m.default_steps
        if not (0 <= spec.guidance_scale <= 30) or not math.isfinite(spec.guidance_scale):
            violations.append(
                (
                    "spec.guidance_scale",
                    f"guidance_scale must be in 0..30 (0 = default); got {spec.guidance_scale}",
                )
            )
        if spec.language and spec.language not in m.languages:
            violations.append(
                (
                    "spec.language",
                    f"language {spec.language!r} is not supported; choose one of {', '.join(m.languages)}",
                )
            )
        if spec.style_adapter:
            usable = [a.name for a in self.adapters_for(tenant)]
            if spec.style_adapter not in usable:
                self.rules.refresh()  # installed since the gateway started?
                usable = [a.name for a in self.adapters_for(tenant)]
            if spec.style_adapter not in usable:  # another tenant's reads as absent: nothing leaks
                violations.append(("spec.style_adapter", f"style adapter {spec.style_adapter!r} is not available; "
                                   f"choose one of: {', '.join(usable) or 'none installed'}"))  # fmt: skip
            if not (0 <= spec.style_strength <= 2) or not math.isfinite(spec.style_strength):
                violations.append(("spec.style_strength",
                                   f"style_strength must be in 0..2 (0 = 1); got {spec.style_strength}"))  # fmt: skip
            elif not spec.style_strength:
                out.style_strength = 1.0
        elif not (0 <= spec.style_strength <= 2) or not math.isfinite(spec.style_strength):  # the range first
            violations.append(("spec.style_strength",
                               f"style_strength must be in 0..2 (0 = 1); got {spec.style_strength}"))  # fmt: skip
        elif spec.style_strength:
            violations.append(("spec.style_strength", "style_strength needs a style_adapter"))
        if spec.HasField("step_cache"):
            if not (0 <= spec.step_cache <= MAX_STEP_CACHE) or not math.isfinite(spec.step_cache):
                violations.append(("spec.step_cache", f"step_cache must be in 0..{MAX_STEP_CACHE:g} (0 = off); "
                                                      f"got {spec.step_cache}"))  # fmt: skip
        else:  # the tier's default (off unless the operator configured one)
            out.step_cache = policy.step_cache if policy else 0.0
        if violations:
            raise InvalidArgument("; ".join(d for _, d in violations), violations=violations)
        if not spec.HasField("seed"):
            out.seed = random.randrange(1, 2**31)
        out.prompt = prompt
        return out

    def adapters_for(self, tenant: str) -> list[common_pb2.AdapterInfo]:
        """The style adapters `tenant` may use: public ones and those in its own folder."""
        if self.rules.info is None:
            raise Unavailable("the gateway is still starting", retry_after=1.0)
        return [a for a in self.rules.info.adapters if lora_owner(a.name) in ("", tenant)]

    def plan(self, spec: common_pb2.VideoSpec, watermark: str = "", visible: bool = False) -> Plan:
        m = self.rules.info
        prompt = spec.prompt + (f", {spec.style}" if spec.style else "")
        if rule_driven(m):
            # frames come out of the denoiser at the requested size and count; the upscaler passes them
            # through at the native rate, or interpolates them to spec.fps
            base = (spec.num_frames, spec.width, spec.height)
            frames = output_frames(spec.num_frames, m.fps, spec.fps)
        else:  # the default model: its one base size and clip length, raised by the upscaler
            base = (m.frame_counts[0], m.sizes[0].width, m.sizes[0].height)
            frames = int(round(spec.duration_seconds * spec.fps))
        return Plan(
            prompt=prompt,
            negative=spec.negative_prompt,
            base_frames=base[0],
            base_width=base[1],
            base_height=base[2],
            base_fps=m.fps,
            width=spec.width,
            height=spec.height,
            fps=spec.fps,
            frames=frames,
            seed=spec.seed,
            steps=spec.num_steps,
            guidance=spec.guidance_scale,
            guidance_2=spec.guidance_scale_2,
            encoder_model=m.encoder_model,
            expect_motion=expects_motion(spec.prompt),
            watermark=watermark,
            visible_mark=visible,
            adapter=spec.style_adapter,
            adapter_strength=spec.style_strength,
            step_cache=spec.step_cache,
        )

    def marks(self, spec: common_pb2.VideoSpec, tier: str) -> tuple[bool, bool]:
        """(visible, invisible): which marks a job of this tier and size carries (the plan applies
        them; the cache key covers them)."""
        visible = self.settings.visible_watermark and self.policy(tier).visible_watermark
        # a frame needs a few 8x8 blocks per payload bit for the mark to survive encoding
        room = (spec.width // 8) * (spec.height // 8) >= 4 * TOTAL_BITS
        return visible, self.settings.invisible_watermark and room

    def plan_for(self, job: Job, video: gateway_pb2.Video) -> Plan:
        visible, invisible = self.marks(video.spec, job.tier)
        return self.plan(video.spec, watermark=video.watermark if invisible else "", visible=visible)

    def cache_key(self, spec: common_pb2.VideoSpec, tenant: Tenant, template_id: str = "") -> str:
        """Everything that changes the stored bytes, and whose results may be shared.

        A result is cached per tenant: another tenant's hit would hand over that tenant's bytes (its
        invisible payload, its tier's visible mark) and its timing would tell what the other tenant
        generated. Only renderings of public templates with public settings are shared across tenants
        (templates exist to be served instantly; their prompt is the library's, not a tenant's).
        The key covers the marks (visible: tier and its text/position/opacity; invisible: on/off and
        the key's hash), the model, text encoder and style adapter versions, and the normalised spec.
        """
        import hashlib

        m = self.rules.info
        s = self.settings
        adapter_version = next((a.version for a in m.adapters if a.name == spec.style_adapter), "")
        shared = bool(template_id) and self.public_rendering(spec, template_id)
        visible, invisible = self.marks(spec, tenant.tier)
        parts = [
            "shared" if shared else f"tenant:{tenant.name}", template_id,
            spec.prompt.strip().casefold(), spec.negative_prompt.strip().casefold(), spec.style.strip().casefold(),
            f"{spec.width}x{spec.height}", f"{spec.fps:g}", f"{spec.duration_seconds:g}", str(spec.num_steps),
            f"{spec.guidance_scale:g}", str(spec.seed), f"{m.name}@{m.version}", m.encoder_model,
            spec.style_adapter, adapter_version, f"{spec.style_strength:g}",
            # only when set, so the default model's keys are what they were
            *([f"frames={spec.num_frames}"] if spec.num_frames else []),
            *([f"guidance2={spec.guidance_scale_2:g}"] if spec.guidance_scale_2 else []),
            *([f"step_cache={spec.step_cache:g}"] if spec.step_cache else []),
            f"visible={visible}:{s.watermark_text}:{s.watermark_position}:{s.watermark_opacity:g}" if visible else "",
            "invisible=" + hashlib.sha256(s.watermark_key.encode()).hexdigest()[:16] if invisible else "",
        ]  # fmt: skip
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def public_rendering(self, spec: common_pb2.VideoSpec, template_id: str) -> bool:
        """The spec is a template rendered from the library's own words only (choices and defaults),
        with the template's style, no negative prompt and no tenant's style adapter."""
        try:
            t = self.templates.get(template_id)
        except VideomeshError:
            return False
        return (spec.prompt.strip() in t.public_prompts() and spec.style == t.style and not spec.negative_prompt
                and lora_owner(spec.style_adapter) == "")  # fmt: skip
