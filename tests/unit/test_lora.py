"""Brand style adapters (LoRA): training deltas, merging for serving, exact restore."""

import pytest
import torch

from services.denoiser import lora
from services.denoiser.model import MODELS, MoEDenoiser


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, cfg.height, cfg.width, generator=g)
    text = torch.randn(1, 5, cfg.unet.text_dim, generator=g)
    return x, torch.tensor([0.5]), text, torch.ones(1, 5, dtype=torch.bool)


def _trained_adapter(model, cfg, steps=3):
    lcfg = lora.LoRAConfig(rank=2, alpha=2.0)
    params = lora.attach(model, lcfg, seed=1)
    opt = torch.optim.SGD(params, lr=0.5)
    x, t, text, mask = _inputs(cfg)
    for _ in range(steps):
        loss = model.experts["high_noise"](x, t, text, mask).square().mean() - 1.0
        opt.zero_grad()
        (-loss).backward()  # push the output somewhere: any change will do
        opt.step()
    with torch.no_grad():
        tuned = model.experts["high_noise"](x, t, text, mask)
    return lora.detach(model, lcfg, name="acme/bright", base_model=cfg.name, description="test"), tuned


def test_adapter_trains_only_its_deltas_detaches_and_merges_to_the_same_output(tmp_path):
    cfg = MODELS["tiny"]
    torch.manual_seed(0)
    model = MoEDenoiser(cfg).eval()
    for p in model.parameters():  # a base whose output is not all zero
        torch.nn.init.normal_(p, std=0.05)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, text, mask = _inputs(cfg)
    with torch.no_grad():
        before = model.experts["high_noise"](x, t, text, mask)
    adapter, tuned = _trained_adapter(model, cfg)
    assert not torch.allclose(tuned, before, atol=1e-4)
    # the base weights are untouched and the model is plain again
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert not any(".motion." in p for p in adapter.layers)  # motion heads are never adapted
    adapter.save(tmp_path / "a.safetensors")
    loaded = lora.Adapter.load(tmp_path / "a.safetensors", "acme/bright")
    assert loaded.rank == 2 and loaded.description == "test" and loaded.layers.keys() == adapter.layers.keys()

    slot = lora.AdapterSlot(model)
    slot.use(loaded)
    with torch.no_grad():
        merged = model.experts["high_noise"](x, t, text, mask)
    assert (merged - tuned).abs().max() < 0.02 * tuned.abs().max()  # bf16 storage of down/up
    slot.use(loaded, 0.5)  # another strength: re-merged from the originals
    with torch.no_grad():
        half = model.experts["high_noise"](x, t, text, mask)
    assert not torch.allclose(half, merged) and not torch.allclose(half, before)
    slot.use(None)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())  # bit for bit
    assert slot.active is None


def test_an_adapter_for_another_model_is_refused_and_changes_nothing(tmp_path):
    cfg = MODELS["tiny"]
    model = MoEDenoiser(cfg)
    adapter, _ = _trained_adapter(MoEDenoiser(cfg), cfg, steps=1)
    path = next(iter(adapter.layers))
    down, up = adapter.layers[path]
    adapter.layers[path] = (down, torch.zeros(up.shape[0] + 1, up.shape[1]))
    adapter.layers["experts.high_noise.nope"] = (down, up)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    slot = lora.AdapterSlot(model)
    with pytest.raises(ValueError, match="adapter 'acme/bright'"):
        slot.use(adapter)
    assert slot.active is None and all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["brand", "acme/spring-look", "a_1/b-2"])
def test_good_adapter_names(name):
    assert lora.check_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b/c", "Acme/x", "x.safetensors", "/abs", "a/"])
def test_bad_adapter_names(name):
    with pytest.raises(ValueError, match="adapter name"):
        lora.check_name(name)


def test_owner():
    assert lora.owner("acme/look") == "acme" and lora.owner("public-look") == ""
