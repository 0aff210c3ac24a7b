"""The denoiser knows the text encoder its weights need from the weights themselves (issue #19 item 7),
not by hashing an encoder file on its own disk: the services may run on different machines."""

from __future__ import annotations

import json

import pytest
import torch

from services.denoiser.backends.base import DenoiseJob
from services.denoiser.engine import WEIGHTS_DIR, DenoiserEngine, DenoiserSettings, declared_encoder
from services.denoiser.model import MODELS, MoEDenoiser
from videomesh import weights
from videomesh.errors import FailedPrecondition

ENCODER_WEIGHTS = WEIGHTS_DIR.parents[1] / "encoder" / "weights"


def _tiny_weights(path, metadata=None):
    torch.manual_seed(0)
    return weights.save(MoEDenoiser(MODELS["tiny"]).state_dict(), path, metadata=metadata)


def _job() -> DenoiseJob:
    t, m = torch.zeros(1, 2, 32), torch.ones(1, 2, dtype=torch.bool)
    return DenoiseJob(t, m, t, m, frames=4, height=16, width=16, seed=0, steps=2, guidance=0.0)


def test_the_shipped_weights_declare_the_shipped_encoder():
    # what the two services agree on when deployed apart: the record beside the denoiser weights
    # names the encoder weights built with them (re-export both with train.py, or fix the record)
    path = WEIGHTS_DIR / "default.safetensors"
    if not path.exists():
        pytest.skip("no shipped default weights")
    declared = declared_encoder(MODELS["default"], path, weights.file_version(path))
    assert declared == f"default@{weights.file_version(ENCODER_WEIGHTS / 'default.safetensors')}"


def test_the_engine_reads_its_encoder_from_the_weights_not_the_encoders_disk(tmp_path):
    path = tmp_path / "tiny.safetensors"
    _tiny_weights(path, metadata={"model": "tiny", "encoder": "tiny@0123456789ab"})
    e = DenoiserEngine(DenoiserSettings(model="tiny", weights=path))
    e.load()
    assert e.encoder_model == "tiny@0123456789ab"
    e.check(_job(), "tiny@0123456789ab")
    with pytest.raises(
        FailedPrecondition, match="encoder tiny@untrained.*trained with tiny@0123456789ab"
    ) as err:
        e.check(_job(), "tiny@untrained")
    assert err.value.reason == "ENCODER_MISMATCH"


def test_a_record_beside_older_weights_counts_only_for_those_weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    version = _tiny_weights(path)
    side = tmp_path / "tiny.encoder.json"
    side.write_text(json.dumps({"weights": version, "encoder": "tiny@aaaaaaaaaaaa"}))
    assert declared_encoder(MODELS["tiny"], path, version) == "tiny@aaaaaaaaaaaa"
    # retrained weights without the metadata: the old record does not speak for them
    side.write_text(json.dumps({"weights": "another", "encoder": "tiny@aaaaaaaaaaaa"}))
    assert declared_encoder(MODELS["tiny"], path, version) == ""
    # untrained weights pair with an untrained encoder
    assert (
        declared_encoder(MODELS["tiny"], tmp_path / "missing.safetensors", weights.UNTRAINED)
        == "tiny@untrained"
    )


def test_train_export_records_the_encoder(tmp_path, monkeypatch):
    from services.denoiser import train

    monkeypatch.setattr(train, "ROOT", tmp_path)
    cfg = train.TrainConfig(model="tiny")
    torch.manual_seed(0)
    from services.encoder.model import TEXT_ENCODERS, TextEncoder

    den, enc = train.export(MoEDenoiser(MODELS["tiny"]), TextEncoder(TEXT_ENCODERS["tiny"]), cfg, {})
    assert weights.metadata(den)["encoder"] == f"tiny@{weights.file_version(enc)}"
