"""A procedural, captioned world of moving shapes: training data and a judge for the default model.

`generator` renders clips from a :class:`ClipSpec`, `captions` describes them in English, Chinese and
Japanese (with a held-out split of phrasings for evaluation), and `detector` reads a clip back with
plain OpenCV to score prompt adherence.
"""

from .captions import LANGS, SPLITS, VOCABULARIES, caption, heldout_only_words, heldout_prompts, template_ids
from .detector import Detection, detect, score
from .generator import (
    BACKGROUNDS,
    COLORS,
    CORE_MOTIONS,
    EXTRA_MOTIONS,
    MOTIONS,
    SHAPES,
    SIZES,
    Clip,
    ClipSpec,
    make_clip,
    render_clip,
    sample_spec,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "CORE_MOTIONS",
    "EXTRA_MOTIONS",
    "LANGS",
    "MOTIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "VOCABULARIES",
    "Clip",
    "ClipSpec",
    "Detection",
    "caption",
    "detect",
    "heldout_only_words",
    "heldout_prompts",
    "make_clip",
    "render_clip",
    "sample_spec",
    "score",
    "template_ids",
]
