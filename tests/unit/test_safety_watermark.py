"""The invisible watermark survives H.264; the visible mark stays in its corner.

The content-safety tests are in test_safety.py."""

import numpy as np
import pytest

from gateway.media import Mp4Writer, read_frames
from gateway.watermark import TOTAL_BITS, InvisibleWatermark, VisibleMark, _bits, payload_for
from services.qc import calibrate


@pytest.mark.parametrize("kind", ["world", "face"])
def test_invisible_watermark_survives_h264(tmp_path, kind):
    rng = np.random.default_rng(0)
    clip = (
        calibrate.world_clip(rng, "left")
        if kind == "world"
        else calibrate.face_clip(rng, calibrate._astronaut())
    )
    wm = InvisibleWatermark(key="test")
    payload = payload_for("vid_123")
    marked = np.stack([wm.embed(f, payload) for f in clip])
    psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - clip) ** 2))
    assert psnr > 40  # invisible: a few grey levels at most
    out = tmp_path / "m.mp4"
    w = Mp4Writer(out, width=256, height=256, fps=24)  # the default quality (CRF 18)
    for f in marked:
        w.write(f)
    w.close()
    decoded = read_frames(out)
    truth = _bits(payload)
    per_frame = np.mean([np.mean((wm.votes(f) > 0) == truth) for f in decoded])
    print(
        f"{kind}: PSNR {psnr:.1f} dB, bit accuracy per frame after H.264 {per_frame:.4f} over {TOTAL_BITS} bits"
    )
    assert per_frame >= 0.95
    got, conf, ok = wm.extract(decoded)
    assert ok and got == payload
    assert not wm.extract(clip)[2]  # an unmarked clip does not pass the checksum
    assert wm.extract(decoded)[0] != InvisibleWatermark(key="other").extract(decoded)[0]  # keyed


def test_visible_mark_changes_only_its_corner():
    frame = np.full((256, 256, 3), 40, np.uint8)
    out = VisibleMark("videomesh", "bottom-right", 0.5).apply(frame)
    changed = np.argwhere((out != frame).any(-1))
    assert len(changed) and changed[:, 0].min() > 200 and changed[:, 1].min() > 100
