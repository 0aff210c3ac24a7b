"""Each quality check fires on its defect and stays quiet on clean clips (a slice of the calibration suite)."""

import numpy as np
import pytest

from services.qc import calibrate
from services.qc.checks import FrameStats, QCThresholds, run_checks, runs


@pytest.fixture(scope="module")
def th():
    return QCThresholds.load()


def failed(frames, th, expect_motion=True):
    st = FrameStats(th)
    for f in frames:
        st.add(f)
    return {c.name: c for c in run_checks(st, fps=24, expect_motion=expect_motion, th=th) if not c.passed}


def test_runs():
    assert runs(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]
    assert runs(np.zeros(3, bool)) == []


@pytest.mark.parametrize("kind", ["world", "face"])
def test_clean_clips_pass_and_each_defect_is_caught(kind, th):
    rng = np.random.default_rng(3)
    base = (
        calibrate.world_clip(rng, "right")
        if kind == "world"
        else calibrate.face_clip(rng, calibrate._astronaut())
    )
    assert failed(base, th) == {}
    defects = ["black", "flicker", "frozen", "blur"] + (["face_warp", "face_dup"] if kind == "face" else [])
    for d in defects:
        got = failed(calibrate.corrupt(base, d, rng), th)
        assert set(got) == {calibrate.DEFECTS[d]}, (d, {k: v.detail for k, v in got.items()})


def test_black_frames_report_their_range(th):
    frames = calibrate.world_clip(np.random.default_rng(0), "left")
    frames[10:13] = 0
    c = failed(frames, th)["black_frames"]
    assert c.frames == [(10, 13)]


def test_still_prompt_may_be_still_but_motion_prompt_may_not(th):
    frames = np.repeat(calibrate.world_clip(np.random.default_rng(1), "up")[:1], 30, axis=0)
    assert "frozen" not in failed(frames, th, expect_motion=False)
    assert "frozen" in failed(frames, th, expect_motion=True)


@pytest.mark.parametrize("bg,color", [("gray", "green"), ("gray", "red"), ("navy", "blue")])
def test_a_slow_low_contrast_drift_is_motion_and_a_frozen_run_inside_it_is_caught(bg, color, th):
    # regression: 96 frames at 24 fps of a green ball crossing a grey frame were "frozen" (the
    # consecutive grey thumbnails barely change); the clip's pace is the generated clips'
    from videomesh.world import ClipSpec, render_clip

    frames = render_clip(ClipSpec(bg, "circle", color, "small", "right"), num_frames=192, height=256, width=256,
                         rng=np.random.default_rng(0))  # fmt: skip
    assert failed(frames, th) == {}
    frames[40:72] = frames[40]  # 32 identical frames, 1.3 s
    got = failed(frames, th)
    assert set(got) == {"frozen"}
    ((s, e),) = got["frozen"].frames
    assert abs(s - 40) <= 1 and e == 72


def test_faces_check_with_no_typical_face_and_a_stray_detection(th):
    # regression: most frames without a face and one stray detection crashed the check (max of nothing)
    from services.qc.checks import _check_faces

    boxes = {0: [], 6: [(0.1, 0.1, 0.2, 0.2)], 12: [], 18: []}
    c = _check_faces(boxes, 20, np.zeros(20, bool), np.zeros(20), th)
    assert c.name == "faces"


def test_qc_threads_default_to_every_available_core_and_apply_to_opencv():
    import cv2

    from services.qc.settings import QCSettings, set_opencv_threads
    from videomesh.inference import available_cores

    assert QCSettings().threads == 0
    assert QCSettings().opencv_threads() == available_cores() >= 1
    assert QCSettings(threads=3).opencv_threads() == 3
    with pytest.raises(ValueError, match="threads"):
        QCSettings(threads=-1).validate()
    before = cv2.getNumThreads()
    try:
        assert set_opencv_threads(0) == available_cores() == cv2.getNumThreads()
        assert QCSettings(threads=1).apply_threads() == 1 == cv2.getNumThreads()
    finally:
        cv2.setNumThreads(before)
