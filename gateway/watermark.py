"""Visible and invisible watermarks on every delivered frame.

Invisible: a 40-bit payload (32 bits of the job id's SHA-256 + an 8-bit CRC) embedded by
quantisation index modulation (QIM) in two mid-frequency DCT coefficients of every 8x8 luma
block. Each block carries one bit (a keyed permutation spreads the bits over the frame) with
a keyed dither, so the host image does not interfere; the decoder votes over every block of
every frame, which is what lets the payload survive H.264. Changes per pixel stay at a few
grey levels.

Visible: a text mark (or none), placed and blended as configured.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

PAYLOAD_BITS = 32
CRC_BITS = 8
TOTAL_BITS = PAYLOAD_BITS + CRC_BITS
_COEFFS = ((3, 4), (4, 3))  # mid-frequency: survives H.264's quantiser, invisible at this amplitude


def _basis(u: int, v: int) -> np.ndarray:
    """Orthonormal 8x8 DCT-II basis function (u, v)."""
    x = np.arange(8)
    cu = np.sqrt(1 / 8) if u == 0 else np.sqrt(2 / 8)
    cv = np.sqrt(1 / 8) if v == 0 else np.sqrt(2 / 8)
    return (cu * np.cos((2 * x + 1) * u * np.pi / 16))[:, None] * (cv * np.cos((2 * x + 1) * v * np.pi / 16))[
        None, :
    ]


_BASES = np.stack([_basis(u, v) for u, v in _COEFFS]).astype(np.float32)  # (K, 8, 8)


def crc8(bits: np.ndarray) -> np.ndarray:
    value = int("".join(map(str, bits.astype(int))), 2)
    c = 0
    for byte in value.to_bytes(PAYLOAD_BITS // 8, "big"):
        c ^= byte
        for _ in range(8):
            c = ((c << 1) ^ 0x07) & 0xFF if c & 0x80 else (c << 1) & 0xFF
    return np.array([(c >> (7 - i)) & 1 for i in range(8)], np.uint8)


def payload_for(job_id: str) -> str:
    """The 32-bit payload (8 hex digits) that marks a job's video."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:8]


def _bits(payload_hex: str) -> np.ndarray:
    v = int(payload_hex, 16)
    bits = np.array([(v >> (PAYLOAD_BITS - 1 - i)) & 1 for i in range(PAYLOAD_BITS)], np.uint8)
    return np.concatenate([bits, crc8(bits)])


@dataclass
class _Layout:
    bit_of_block: np.ndarray  # (bh, bw) which payload bit each block carries
    dither: np.ndarray  # (K, bh, bw) in [0, step)


class InvisibleWatermark:
    def __init__(self, key: str = "videomesh", step: float = 24.0):
        self.key = key
        self.step = step
        self._layouts: dict[tuple[int, int], _Layout] = {}

    def _layout(self, bh: int, bw: int) -> _Layout:
        if (bh, bw) not in self._layouts:
            seed = int.from_bytes(hashlib.sha256(f"{self.key}:{bh}x{bw}".encode()).digest()[:8], "big")
            rng = np.random.default_rng(seed)
            bit_of_block = (rng.permutation(bh * bw) % TOTAL_BITS).reshape(bh, bw)
            dither = rng.uniform(0, self.step, (len(_COEFFS), bh, bw)).astype(np.float32)
            self._layouts[(bh, bw)] = _Layout(bit_of_block, dither)
        return self._layouts[(bh, bw)]

    @staticmethod
    def _blocks(y: np.ndarray) -> np.ndarray:
        h, w = y.shape
        return y[: h // 8 * 8, : w // 8 * 8].reshape(h // 8, 8, w // 8, 8)

    def embed(self, frame: np.ndarray, payload_hex: str) -> np.ndarray:
        """Mark one RGB uint8 frame (the same payload in every frame of a video)."""
        ycc = cv2.cvtColor(frame, cv2.COLOR_RGB2YCrCb).astype(np.float32)
        y = ycc[..., 0]
        blocks = self._blocks(y)  # (bh, 8, bw, 8) view into y
        bh, bw = blocks.shape[0], blocks.shape[2]
        lay = self._layout(bh, bw)
        bits = _bits(payload_hex)[lay.bit_of_block].astype(np.float32)  # (bh, bw)
        coef = np.einsum("hiwj,kij->khw", blocks, _BASES)  # (K, bh, bw)
        # QIM: move each coefficient to the nearest point of the lattice for its bit (dithered)
        offset = lay.dither + bits * (self.step / 2)
        target = np.round((coef - offset) / self.step) * self.step + offset
        delta = target - coef
        blocks += np.einsum("khw,kij->hiwj", delta, _BASES)
        ycc[..., 0] = y
        return cv2.cvtColor(np.clip(ycc + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2RGB)

    def votes(self, frame: np.ndarray) -> np.ndarray:
        """Soft evidence per payload bit from one frame: positive = 1, negative = 0."""
        y = cv2.cvtColor(frame, cv2.COLOR_RGB2YCrCb)[..., 0].astype(np.float32)
        blocks = self._blocks(y)
        bh, bw = blocks.shape[0], blocks.shape[2]
        lay = self._layout(bh, bw)
        coef = np.einsum("hiwj,kij->khw", blocks, _BASES)
        # distance to the bit-0 lattice minus distance to the bit-1 lattice, in units of step/4
        r0 = np.abs(((coef - lay.dither) / self.step + 0.5) % 1.0 - 0.5)
        r1 = np.abs(((coef - lay.dither - self.step / 2) / self.step + 0.5) % 1.0 - 0.5)
        soft = (r0 - r1).sum(axis=0)  # (bh, bw)
        return np.bincount(lay.bit_of_block.ravel(), weights=soft.ravel(), minlength=TOTAL_BITS)

    def extract(self, frames) -> tuple[str, float, bool]:
        """Decode a video's frames -> (payload hex, confidence 0..1, CRC ok)."""
        total = np.zeros(TOTAL_BITS)
        weight = np.zeros(TOTAL_BITS)
        for f in frames:
            v = self.votes(f)
            total += v
            weight += np.abs(v)
        bits = (total > 0).astype(np.uint8)
        payload = int("".join(map(str, bits[:PAYLOAD_BITS])), 2)
        crc_ok = bool(np.array_equal(crc8(bits[:PAYLOAD_BITS]), bits[PAYLOAD_BITS:]))
        confidence = float(np.mean(np.abs(total) / np.maximum(weight, 1e-9)))
        return f"{payload:08x}", confidence, crc_ok


@dataclass(frozen=True)
class VisibleMark:
    text: str = "videomesh"
    position: str = "bottom-right"  # top-left | top-right | bottom-left | bottom-right
    opacity: float = 0.45

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if not self.text or self.opacity <= 0:
            return frame
        h, w = frame.shape[:2]
        scale = max(0.3, w / 640)
        thick = max(1, round(scale * 1.5))
        (tw, th), base = cv2.getTextSize(self.text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        pad = max(4, w // 64)
        x = pad if "left" in self.position else w - tw - pad
        y = pad + th if "top" in self.position else h - pad - base
        overlay = frame.copy()
        cv2.putText(
            overlay, self.text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA
        )
        return cv2.addWeighted(overlay, self.opacity, frame, 1 - self.opacity, 0)
