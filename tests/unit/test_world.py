"""The procedural world: rendering, trilingual captions and their split, and the OpenCV judge."""

from __future__ import annotations

import ast
import inspect
import re
from collections import Counter

import cv2
import numpy as np
import pytest

from videomesh.world import (
    BACKGROUNDS,
    COLORS,
    CORE_MOTIONS,
    LANGS,
    MOTIONS,
    SHAPES,
    SIZES,
    ClipSpec,
    caption,
    detect,
    heldout_only_words,
    heldout_prompts,
    make_clip,
    render_clip,
    sample_spec,
    score,
    template_ids,
)
from videomesh.world import detector as detector_module
from videomesh.world.generator import BACKGROUND_RGB

HAN = re.compile(r"[\u4e00-\u9fff]")
KANA = re.compile(r"[\u3040-\u30ff]")


# ------------------------------------------------------------------------------------------ render


@pytest.mark.parametrize(
    ("t", "h", "w"), [(2, 16, 16), (16, 32, 32), (5, 48, 80), (3, 256, 256), (4, 64, 32)]
)
def test_render_shape_and_dtype(t, h, w):
    spec = ClipSpec("gray", "triangle", "red", "large", "right")
    frames = render_clip(spec, num_frames=t, height=h, width=w, rng=np.random.default_rng(0))
    assert frames.shape == (t, h, w, 3) and frames.dtype == np.uint8


def test_render_rejects_bad_arguments():
    spec = ClipSpec("gray", "circle", "red", "small", "left")
    with pytest.raises(ValueError, match="num_frames"):
        render_clip(spec, num_frames=1, height=32, width=32)
    with pytest.raises(ValueError, match="invisible"):
        ClipSpec("white", "circle", "white", "small", "left")
    with pytest.raises(ValueError, match="motion"):
        ClipSpec("black", "circle", "red", "small", "spin")


def test_make_clip_is_deterministic():
    a = make_clip(7, num_frames=8, height=32, width=32, texture=True)
    b = make_clip(7, num_frames=8, height=32, width=32, texture=True)
    assert np.array_equal(a.frames, b.frames) and a.captions == b.captions and a.spec == b.spec
    c = make_clip(8, num_frames=8, height=32, width=32, texture=True)
    assert not np.array_equal(a.frames, c.frames)


def test_seed_fixes_spec_and_captions_at_any_resolution():
    small = make_clip(3, num_frames=4, height=32, width=32)
    big = make_clip(3, num_frames=16, height=128, width=96, texture=True)
    assert small.spec == big.spec and small.captions == big.captions


def test_sample_spec_never_hides_the_object():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng, MOTIONS) for _ in range(2000)]
    assert all(s.color != s.background for s in specs)
    # Every value of every attribute is drawn.
    for attr, vocab in [
        ("background", BACKGROUNDS),
        ("shape", SHAPES),
        ("color", COLORS),
        ("motion", MOTIONS),
    ]:
        assert {getattr(s, attr) for s in specs} == set(vocab)


def _object_mask(frames: np.ndarray, background: str) -> np.ndarray:
    return np.abs(frames.astype(int) - np.array(BACKGROUND_RGB[background])).sum(-1) > 0  # (T, H, W)


@pytest.mark.parametrize("size", [32, 128])
def test_object_stays_inside_and_moves_about_half_the_frame(size):
    for seed in range(30):
        spec = sample_spec(np.random.default_rng(seed), CORE_MOTIONS)
        frames = render_clip(spec, num_frames=16, height=size, width=size, rng=np.random.default_rng(seed))
        mask = _object_mask(frames, spec.background)
        assert mask.any(axis=(1, 2)).all()
        border = np.concatenate([mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]], axis=1)
        assert not border.any(), f"{spec} touches the frame border"
        ys, xs = zip(*(np.nonzero(m) for m in (mask[0], mask[-1])), strict=True)
        shift = np.array([xs[1].mean() - xs[0].mean(), ys[1].mean() - ys[0].mean()]) / size
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[
            spec.motion
        ]
        if spec.motion == "still":
            assert np.abs(shift).max() < 1e-6
        else:
            along = float(shift @ np.array(expected))
            assert 0.42 <= along <= 0.58, f"{spec}: travelled {along:.2f} of the frame"


@pytest.mark.parametrize("motion", ["grow", "shrink"])
def test_grow_and_shrink_scale_about_twofold(motion):
    spec = ClipSpec("black", "square", "green", "large", motion)
    frames = render_clip(spec, num_frames=9, height=128, width=128)
    areas = _object_mask(frames, "black").sum(axis=(1, 2))
    ratio = areas[-1] / areas[0]
    assert ratio == pytest.approx(4.0 if motion == "grow" else 0.25, rel=0.15)  # side x2 -> area x4
    assert (np.diff(areas) > 0).all() if motion == "grow" else (np.diff(areas) < 0).all()


def test_sizes_are_distinct_and_rendering_is_antialiased():
    extents = {}
    for size in SIZES:
        frames = render_clip(
            ClipSpec("black", "circle", "white", size, "still"), num_frames=2, height=64, width=64
        )
        mask = _object_mask(frames, "black")[0]
        extents[size] = np.ptp(np.nonzero(mask.any(axis=0))[0]) / 64
        values = np.unique(frames[0, ..., 0])
        assert len(values) > 3, "edges should blend into the background"
    assert 0.18 <= extents["small"] <= 0.27 and 0.34 <= extents["large"] <= 0.43


def test_texture_is_subtle():
    spec = ClipSpec("gray", "circle", "red", "small", "still")
    flat = render_clip(spec, num_frames=2, height=64, width=64, texture=False)
    textured = render_clip(spec, num_frames=2, height=64, width=64, texture=True)
    border = textured[0, :, 0].astype(int) - 128
    assert np.abs(flat[0, :, 0].astype(int) - 128).max() == 0
    assert 2 < np.abs(border).max() < 25


# ----------------------------------------------------------------------------------------- captions


def test_caption_scripts_per_language():
    for seed in range(60):
        clip = make_clip(seed, num_frames=2, height=16, width=16, motions=MOTIONS)
        en, zh, ja = (clip.captions[lang] for lang in LANGS)
        assert en.isascii() and len(en.split()) >= 3
        assert HAN.search(zh) and not KANA.search(zh)
        assert KANA.search(ja)


EN_WORDS = {
    "color": {c: (c,) for c in COLORS} | {"cyan": ("cyan", "turquoise"), "purple": ("purple", "violet")},
    "shape": {
        "circle": ("ball", "circle", "dot", "sphere", "orb"),
        "square": ("square", "box", "cube", "block"),
        "triangle": ("triangle",),
    },
    "motion": {
        "left": ("left",),
        "right": ("right",),
        "up": ("up", "ris", "top", "climb"),
        "down": ("down", "fall", "drop", "bottom", "sink"),
        "still": ("still", "not move", "not moving", "motionless", "in place", "stationary", "put"),
        "grow": ("grow", "bigger", "larger", "expand", "swell"),
        "shrink": ("shrink", "smaller", "contract", "dwindl"),
    },
}
EN_FULL_WORDS = {
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    "background": {
        "black": ("black",),
        "white": ("white",),
        "gray": ("gray", "grey"),
        "navy": ("navy", "dark blue"),
    },
}


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_english_captions_state_colour_shape_and_motion(split):
    rng = np.random.default_rng(1)
    for _ in range(300):
        spec = sample_spec(rng, MOTIONS)
        text = caption(spec, "en", rng, split).lower()
        for attr, words in EN_WORDS.items():
            assert any(w in text for w in words[getattr(spec, attr)]), f"{attr} missing from {text!r}"
        full = caption(spec, "en", rng, split, allow_omit=False).lower()
        for attr, words in EN_FULL_WORDS.items():
            assert any(w in full for w in words[getattr(spec, attr)]), f"{attr} missing from {full!r}"


def test_train_captions_sometimes_omit_size_or_background():
    rng = np.random.default_rng(2)
    spec = ClipSpec("black", "circle", "red", "small", "left")
    texts = [caption(spec, "en", rng, "train") for _ in range(300)]
    assert any("black" not in t for t in texts)
    assert any(not re.search(r"small|little", t) for t in texts)
    assert all("red" in t.lower() for t in texts)


def test_split_templates_are_disjoint_and_about_a_quarter_held_out():
    for lang in LANGS:
        train, held = set(template_ids(lang, "train")), set(template_ids(lang, "heldout"))
        assert train and held and not train & held
        assert 0.19 <= len(held) / (len(train) + len(held)) <= 0.3


def test_train_and_heldout_sentences_never_meet():
    for lang in LANGS:
        rng = np.random.default_rng(3)
        specs = [sample_spec(rng, MOTIONS) for _ in range(1500)]
        train = {caption(s, lang, rng, "train") for s in specs}
        held = {caption(s, lang, rng, "heldout") for s in specs}
        assert not train & held
        words = heldout_only_words(lang)
        assert words
        for text in train:
            for word in words:
                found = re.search(rf"\b{re.escape(word)}\b", text) if lang == "en" else word in text
                assert not found, f"held-out phrase {word!r} in training caption {text!r}"


def test_full_vocabulary_teaches_every_word_but_no_heldout_template():
    rng = np.random.default_rng(5)
    specs = [sample_spec(rng) for _ in range(600)]
    for lang in LANGS:
        held = {caption(s, lang, rng, "heldout") for s in specs}
        full = [caption(s, lang, rng, "train", vocabulary="full") for s in specs]
        assert not set(full) & held
        words = heldout_only_words(lang)
        used = {w for w in words if any(part in text for part in w.split("|") for text in full)}
        assert len(used) >= 0.8 * len(words), sorted(words - used)
        # the core vocabulary is what training always used: the same captions from the same seed
        a, b = np.random.default_rng(9), np.random.default_rng(9)
        assert [caption(s, lang, a) for s in specs[:50]] == [
            caption(s, lang, b, vocabulary="core") for s in specs[:50]
        ]
    with pytest.raises(ValueError, match="vocabulary must be one of"):
        caption(specs[0], "en", rng, "train", vocabulary="all")


def test_heldout_prompts_cover_the_vocabulary_and_are_fixed():
    specs_by_lang = {}
    for lang in LANGS:
        prompts = heldout_prompts(lang, n=120, seed=0)
        assert prompts == heldout_prompts(lang, n=120, seed=0)
        assert len(prompts) == 120 and len({p for p, _ in prompts}) > 100
        specs = [s for _, s in prompts]
        assert {s.color for s in specs} == set(COLORS)
        assert {s.shape for s in specs} == set(SHAPES)
        assert {s.motion for s in specs} == set(CORE_MOTIONS)
        assert {(s.color, s.shape, s.motion) for s in specs} == {
            (c, s, m) for c in COLORS for s in SHAPES for m in CORE_MOTIONS
        }
        specs_by_lang[lang] = specs
    assert specs_by_lang["en"] == specs_by_lang["zh"] == specs_by_lang["ja"]
    small = heldout_prompts("ja", n=8, seed=1)
    assert {s.color for _, s in small} == set(COLORS)
    with pytest.raises(ValueError, match="n must be"):
        heldout_prompts("en", n=5)


# ----------------------------------------------------------------------------------------- detector


def test_detector_is_independent_of_the_generator():
    tree = ast.parse(inspect.getsource(detector_module))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "dataclasses", "typing", "cv2", "numpy"}
    # ... and uses the same words.
    assert detector_module.BACKGROUND_LABELS == BACKGROUNDS
    assert detector_module.COLOR_LABELS == COLORS
    assert detector_module.SHAPE_LABELS == SHAPES
    assert detector_module.SIZE_LABELS == SIZES
    assert detector_module.MOTION_LABELS == MOTIONS


def _degrade(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild sensor noise (sigma 8) after a slight blur (sigma 0.7 px)."""
    blurred = np.stack([cv2.GaussianBlur(f.astype(np.float32), (0, 0), 0.7) for f in frames])
    return np.clip(np.round(blurred + rng.normal(0, 8, blurred.shape)), 0, 255).astype(np.uint8)


def _accuracy(n: int, size: int, noisy: bool, seed0: int) -> dict[str, float]:
    rng = np.random.default_rng(seed0)
    hits: Counter[str] = Counter()
    for seed in range(seed0, seed0 + n):
        # Half the clips carry the background texture; all motions, including grow/shrink.
        clip = make_clip(seed, num_frames=16, height=size, width=size, motions=MOTIONS, texture=seed % 2 == 1)
        frames = _degrade(clip.frames, rng) if noisy else clip.frames
        hits.update(k for k, ok in score(detect(frames), clip.spec).items() if ok)
    return {k: hits[k] / n for k in ("background", "color", "shape", "size", "motion")}


# Measured: 100% on every attribute in all four settings (and at 16x16 and 256x256).
@pytest.mark.parametrize(
    ("n", "size", "noisy", "threshold"),
    [(200, 32, False, 0.98), (50, 128, False, 0.98), (100, 32, True, 0.95), (20, 128, True, 0.95)],
)
def test_detector_accuracy(n, size, noisy, threshold):
    acc = _accuracy(n, size, noisy, seed0=10_000 + size)
    assert min(acc.values()) >= threshold, acc


def test_detector_catches_wrong_prompts():
    rng = np.random.default_rng(4)
    for seed in range(20):
        clip = make_clip(seed, num_frames=16, height=32, width=32, motions=MOTIONS)
        spec = clip.spec
        other_color = next(
            c for c in COLORS[rng.integers(8) :] + COLORS if c not in (spec.color, spec.background)
        )
        other_shape = SHAPES[(SHAPES.index(spec.shape) + 1) % 3]
        other_motion = MOTIONS[(MOTIONS.index(spec.motion) + 1) % len(MOTIONS)]
        det = detect(clip.frames)
        wrong = ClipSpec(spec.background, other_shape, other_color, spec.size, other_motion)
        assert score(det, wrong) == {
            "background": True,
            "color": False,
            "shape": False,
            "size": True,
            "motion": False,
        }


def test_detector_on_an_empty_clip():
    det = detect(np.full((4, 32, 32, 3), 128, np.uint8))
    assert det.background == "gray"
    assert (det.color, det.shape, det.size, det.motion) == (None, None, None, None)
    assert np.isnan(det.areas).all()
    with pytest.raises(ValueError, match="T, H, W, 3"):
        detect(np.zeros((32, 32, 3), np.uint8))


def test_heldout_only_words_per_attribute_and_the_eval_split():
    from services.denoiser.evaluate import unseen_by_attribute

    shape = heldout_only_words("en", "shape")
    assert {"block", "sphere", "orb"} <= shape and "violet" not in shape and shape <= heldout_only_words("en")
    assert "橘色" in heldout_only_words("zh", "color")
    # a held-out motion word does not make the (training) shape word unseen
    assert unseen_by_attribute("zh", "黑色背景上，一个绿色的小球缓缓下沉") == {
        "color": False,
        "shape": False,
        "motion": True,
    }
    assert unseen_by_attribute("en", "a huge block in white drifting upward")["shape"]
