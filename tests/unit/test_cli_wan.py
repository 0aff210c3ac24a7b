"""`videomesh up --model wan2.2 --model-dir DIR` and generate's Wan flags, without starting anything."""

import json

import pytest

from videomesh import cli


def test_up_wan_needs_a_servable_directory_before_anything_starts(tmp_path, capsys):
    assert cli.main(["up", "--model", "wan2.2", "--data-dir", str(tmp_path / "d")]) == cli.EXIT_USAGE
    assert "--model wan2.2 needs --model-dir DIR" in capsys.readouterr().err
    assert cli.main(["up", "--model", "wan2.2", "--model-dir", str(tmp_path)]) == cli.EXIT_USAGE
    assert "model_index.json not found" in capsys.readouterr().err
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                           "tokenizer": ["transformers", "T5TokenizerFast"]}))  # fmt: skip
    with pytest.raises(cli.UsageError, match=r"tokenizer/ not found.*download is incomplete"):
        cli.model_args("wan2.2", str(tmp_path))
    with pytest.raises(cli.UsageError, match="--model-dir is for --model wan2.2"):
        cli.model_args("default", str(tmp_path))
    assert cli.model_args("default", None) == {}


def test_up_passes_the_model_to_the_encoder_and_the_denoiser(tmp_path):
    pytest.importorskip("diffusers")
    from tests.wan_tiny import save_tiny_wan

    d = save_tiny_wan(tmp_path / "wan", "t2v")
    extra = cli.model_args("wan2.2", str(d))
    assert extra == {
        n: ["--model", "wan2.2", "--model-dir", str(d.resolve())] for n in ("encoder", "denoiser")
    }


def test_generate_maps_frames_and_guidance_2_and_names_them_in_errors():
    args = cli.build_parser().parse_args(["generate", "x", "--frames", "81", "--guidance-2", "3.5"])
    spec = cli._spec(args)
    assert (spec.num_frames, spec.guidance_scale_2) == (81, 3.5)
    assert cli._user_words("num_frames must be 4k+1 for this model; got 80 — use 81").startswith(
        "--frames must"
    )
    assert cli._user_words("guidance_scale_2 must be in 0..30") == "--guidance-2 must be in 0..30"
    assert cli._user_words("guidance_scale must be in 0..30") == "--guidance must be in 0..30"
    assert cli.FIELD_FLAGS["spec.num_frames"] == "--frames"
    with pytest.raises(cli.UsageError, match="--frames"):
        cli._spec(cli.build_parser().parse_args(["generate", "x", "--frames", "-1"]))
