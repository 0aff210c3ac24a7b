"""The model family: shapes, expert routing, samplers, text encoder, training loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.denoiser.model import MODELS, MoEDenoiser, UNet, UNetConfig
from services.denoiser.sampling import SamplingCancelled, cfg_velocity, flow_timesteps, sample_euler
from services.encoder.model import TEXT_ENCODERS, TextEncoder, detect_language, normalize, tokenize


def tiny_config():
    return MODELS["tiny"]


@pytest.mark.parametrize("patch", [1, 2])
def test_unet_keeps_shape_and_starts_at_zero(patch):
    cfg = UNetConfig(
        patch=patch, base=8, mults=(1, 2), attn=(False, True), heads=2, text_dim=16, emb_dim=16, max_frames=8
    )
    net = UNet(cfg)
    x = torch.randn(2, 5, 3, 16, 16)
    v = net(x, torch.rand(2), torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.bool))
    assert v.shape == x.shape
    assert torch.all(v == 0)  # zero-initialised output conv: training starts from "predict nothing"


def test_unet_rejects_bad_sizes_with_a_useful_message():
    net = UNet(
        UNetConfig(patch=2, base=8, mults=(1, 2), attn=(False, False), text_dim=16, emb_dim=16, max_frames=4)
    )
    with pytest.raises(ValueError, match="multiples of 4"):
        net(
            torch.randn(1, 2, 3, 18, 18),
            torch.rand(1),
            torch.randn(1, 3, 16),
            torch.ones(1, 3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="at most 4 frames"):
        net(
            torch.randn(1, 6, 3, 16, 16),
            torch.rand(1),
            torch.randn(1, 3, 16),
            torch.ones(1, 3, dtype=torch.bool),
        )


def test_text_reaches_every_frame_differently():
    """The per-frame path: after a little training signal, frames differ by position even for a static input."""
    torch.manual_seed(0)
    cfg = tiny_config().unet
    net = UNet(cfg)
    for p in net.parameters():  # break the zero-init so outputs depend on the inputs
        torch.nn.init.normal_(p, std=0.05)
    x = torch.zeros(1, 4, 3, 16, 16)
    text_a, text_b = torch.randn(1, 3, cfg.text_dim), torch.randn(1, 3, cfg.text_dim)
    m = torch.ones(1, 3, dtype=torch.bool)
    va, vb = net(x, torch.tensor([0.5]), text_a, m), net(x, torch.tensor([0.5]), text_b, m)
    assert not torch.allclose(va, vb)
    assert not torch.allclose(va[:, 0], va[:, -1])  # identical input frames, different output per frame


def test_moe_routes_by_boundary():
    model = MoEDenoiser(tiny_config())
    b = model.cfg.boundary
    assert model.expert_for(1.0) == "high_noise" and model.expert_for(b) == "high_noise"
    assert model.expert_for(b - 1e-3) == "low_noise" and model.expert_for(0.0) == "low_noise"
    assert set(model._shard_modules) == {"high_noise", "low_noise"}


def test_flow_timesteps_and_shift():
    t = flow_timesteps(10)
    assert t[0] == 1 and t[-1] == 0 and torch.all(t[1:] < t[:-1])
    shifted = flow_timesteps(10, shift=3.0)
    assert torch.all(shifted[1:-1] > t[1:-1])  # shift > 1 spends more steps at high noise


def test_euler_integrates_a_known_flow_exactly():
    # For data x0 and noise e, the true velocity along the straight path is e - x0.
    x0, e = torch.randn(3, 4), torch.randn(3, 4)
    out = sample_euler(lambda x, t: e - x0, e.clone(), flow_timesteps(7))
    torch.testing.assert_close(out, x0)


def test_sampler_stops_between_steps_and_reports_each_step():
    seen = []
    calls = iter(range(100))
    with pytest.raises(SamplingCancelled):
        sample_euler(lambda x, t: x * 0, torch.zeros(1), flow_timesteps(10), callback=lambda s, n, t: seen.append(s),
                     should_stop=lambda: next(calls) >= 3)  # fmt: skip
    assert seen == [1, 2, 3]


def test_cfg_combines_branches():
    def net(x, t, text, mask):
        return text[:, :1, :1].reshape(-1, 1).expand_as(x)  # velocity = first text value

    cond = (torch.full((1, 2, 3), 2.0), torch.ones(1, 2, dtype=torch.bool))
    uncond = (torch.full((1, 1, 3), 1.0), torch.ones(1, 1, dtype=torch.bool))
    v = cfg_velocity(net, cond, uncond, lambda t: 4.0)(torch.zeros(1, 5), torch.tensor([0.5]))
    torch.testing.assert_close(v, torch.full((1, 5), 1.0 + 4.0 * (2.0 - 1.0)))


def test_text_encoder_all_languages_and_normalisation():
    enc = TextEncoder(TEXT_ENCODERS["tiny"]).eval()
    states, mask = enc.encode(["a red ball", "红色的小球", "赤いボール", ""])
    assert states.shape[:2] == mask.shape and mask[3].sum() == 1  # BOS only for the empty text
    assert normalize("ＡＢＣ　Ｒｅｄ") == "abc red"  # full width folded, case folded
    ids_a, _ = tokenize(["RED"], enc.cfg)
    ids_b, _ = tokenize(["ｒｅｄ"], enc.cfg)
    assert torch.equal(ids_a, ids_b)
    assert [detect_language(t) for t in ("a ball", "红色", "赤いボール", "赤")] == ["en", "zh", "ja", "zh"]


def test_make_train_reproduces_the_shipped_recipe():
    """`make train` (the defaults) is the run that wrote the shipped weights: every setting in
    their train_config metadata, the vocabulary included, is today's default."""
    import json
    from dataclasses import asdict

    from services.denoiser import train as tr
    from videomesh import weights

    shipped = json.loads(
        weights.metadata(tr.ROOT / "services/denoiser/weights/default.safetensors")["train_config"]
    )
    defaults = json.loads(json.dumps(asdict(tr.TrainConfig()), default=str))
    where = ("out", "device", "threads")  # where and on what it ran, not what it trained
    assert {k: v for k, v in shipped.items() if k not in where} == {
        k: v for k, v in defaults.items() if k not in where
    }
    assert tr.training_vocabulary() == "full"


def test_shipped_evaluations_are_of_the_shipped_weights_and_meet_the_targets():
    """The model card's figures are the saved `make eval` runs beside the weights: of these very
    weights (the mesh's name@version for every clip), on the held-out prompts, over target."""
    import json

    from services.denoiser import evaluate as ev
    from services.denoiser import train as tr
    from videomesh.weights import file_version
    from videomesh.world import LANGS, heldout_prompts

    wdir = tr.ROOT / "services" / "denoiser" / "weights"
    version = f"default@{file_version(wdir / 'default.safetensors')}"
    for name, per_lang, seed in (("default.eval.json", 24, 0), ("default.eval-48-seed1.json", 48, 1)):
        saved = json.loads((wdir / name).read_text())
        assert {r["model"] for r in saved["rows"]} == {version}, (
            f"{name} measured other weights: re-run the eval"
        )
        for lang in LANGS:
            asked = [p for p, _ in heldout_prompts(lang, per_lang, seed=seed)]
            assert [r["prompt"] for r in saved["rows"] if r["lang"] == lang] == asked
        table = ev.summarize(saved["rows"])["table"]
        assert all(r[k] >= t for r in table.values() for k, t in ev.TARGETS.items()), table


def test_training_loop_runs_resumes_and_exports(tmp_path, monkeypatch):
    from services.denoiser import train as tr
    from services.encoder.train import TextTrainConfig

    cfg = tr.TrainConfig(model="tiny", steps=4, motion_steps=0, align_steps=0, detail_steps=0, batch=2, warmup=1, eval_every=4, eval_per_lang=1,
                         ckpt_every=2, out=tmp_path / "ckpt", vocabulary="core", text=TextTrainConfig(model="tiny", steps=3, batch=4, vocabulary="core"))  # fmt: skip
    with pytest.raises(ValueError, match="the same for the text encoder"):
        tr.train(tr.TrainConfig(**{**cfg.__dict__, "vocabulary": "full"}))  # the encoder's left "core"
    res = tr.train(cfg)
    assert (tmp_path / "ckpt" / "ckpt.pt").exists()
    # a checkpoint is not resumed with other training words, and neither is a phase-1 encoder
    full = TextTrainConfig(**{**cfg.text.__dict__, "vocabulary": "full"})
    other = tr.TrainConfig(**{**cfg.__dict__, "vocabulary": "full", "text": full})
    d = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="ckpt.pt was trained with vocabulary 'core'"):
        tr.train(other)
    (d / "ckpt.pt").rename(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="text_encoder.safetensors was trained with vocabulary 'core'"):
        tr.train(other)
    (tmp_path / "ckpt.pt").rename(d / "ckpt.pt")
    (d / "text_encoder.safetensors").rename(tmp_path / "encoder")
    with pytest.raises(ValueError, match="ckpt.pt was trained with vocabulary 'core'"):
        tr.train(other)
    assert not (d / "text_encoder.safetensors").exists()  # refused before phase 1 was retrained
    (tmp_path / "encoder").rename(d / "text_encoder.safetensors")
    log = (tmp_path / "ckpt" / "log.jsonl").read_text()
    assert '"eval"' in log and '"phase": "text"' in log
    before = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=False)["ema"]
    # resume: a longer run (the motion phase added) continues from step 4 instead of starting over
    cfg2 = tr.TrainConfig(**{**cfg.__dict__, "motion_steps": 2})
    tr.train(cfg2)
    after = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=False)
    assert after["step"] == 6
    # the motion phase trains the high-noise expert only
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after["ema"][k])}
    assert changed == {"high_noise"}
    assert not any(v.any() for k, v in after["ema"].items() if ".motion." in k)  # heads untouched so far
    # the aligned phase fits both experts' motion heads (zero until then)
    tr.train(tr.TrainConfig(**{**cfg2.__dict__, "align_steps": 2}))
    last = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=False)
    assert last["step"] == 8
    for expert in ("high_noise", "low_noise"):
        assert last["ema"][f"experts.{expert}.motion.bias"].any()
    # resumed inside the aligned phase: the optimiser keeps its two groups (heads at 10x the rate)
    tr.train(tr.TrainConfig(**{**cfg2.__dict__, "align_steps": 4}))
    resumed = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=False)
    assert resumed["step"] == 10
    groups = resumed["opt"]["param_groups"]
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 10.0]
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    # the detail phase trains the low-noise expert only
    tr.train(tr.TrainConfig(**{**cfg2.__dict__, "align_steps": 4, "detail_steps": 2}))
    detail = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=False)
    assert detail["step"] == 12
    changed = {
        k.split(".")[1] for k in resumed["ema"] if not torch.equal(resumed["ema"][k], detail["ema"][k])
    }
    assert changed == {"low_noise"}
    monkeypatch.setattr(tr, "ROOT", tmp_path)
    den, enc = tr.export(res["ema"], res["encoder"], cfg, {"train_minutes": "0"})
    from safetensors import safe_open

    with safe_open(str(den), "pt") as f:
        assert f.metadata()["model"] == "tiny"
        assert any(k.startswith("experts.low_noise.") for k in f.keys())
    # the words its captions used travel with the weights (the eval table and train-adapter read it)
    assert tr.training_vocabulary(den) == "core"
    den, _ = tr.export(
        res["ema"], res["encoder"], tr.TrainConfig(**{**cfg.__dict__, "vocabulary": "full", "text": full}), {}
    )
    assert tr.training_vocabulary(den) == "full"
    assert np.isfinite(res["minutes"])


def test_optimiser_state_from_before_the_motion_heads_resumes_in_place():
    """A checkpoint saved before the motion heads existed: the saved Adam moments land on the
    same parameters of today's model; the heads start with none."""
    from services.denoiser import train as tr

    torch.manual_seed(0)
    model = MoEDenoiser(MODELS["tiny"])
    heads = [n for n, _ in model.named_parameters() if ".motion." in n]
    assert heads
    old = torch.optim.AdamW([p for n, p in model.named_parameters() if ".motion." not in n], lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    saved = old.state_dict()
    new = tr._optimizer(model, tr.TrainConfig(), aligned=False)
    new.load_state_dict(tr._with_new_params(saved, model, heads))
    for name, p in model.named_parameters():
        if name in heads:
            assert p not in new.state
        else:
            assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    with pytest.raises(RuntimeError, match="does not fit"):
        tr._with_new_params(saved, model, heads[:1])
    assert tr._with_new_params(saved, model, []) is saved


def test_shift_frames_moves_content_and_the_track_follows_the_text_head():
    from services.denoiser.model import UNet, shift_frames

    x = torch.zeros(2, 1, 8, 8)
    x[:, :, 3, 3] = 1.0
    d = torch.tensor([[2 / 8, 0.0], [0.0, -2 / 8]])  # one pixel, in [-1, 1] units
    y = shift_frames(x, d)
    assert y[0, 0, 3, 2] == pytest.approx(1.0) and y[0, 0, 3, 3] == pytest.approx(0.0)  # content moves by -d
    assert y[1, 0, 4, 3] == pytest.approx(1.0)
    assert torch.allclose(shift_frames(y, -d), x, atol=1e-6)
    assert shift_frames(x, None) is x

    net = UNet(MODELS["tiny"].unet)
    pooled = torch.randn(3, MODELS["tiny"].unet.text_dim)
    assert net.track(pooled, 4) is None  # untrained head: plain temporal layers
    assert torch.equal(net.motion_vector(pooled), torch.zeros(3, 2))  # uniform over the classes: no motion
    with torch.no_grad():
        net.motion.bias.copy_(torch.tensor([0.0, 0.0, 30.0, 0.0, 0.0]))  # surely "right"
    track = net.track(pooled, 4).reshape(3, 4, 2)
    assert torch.allclose(track[0, :, 0], torch.tensor([-0.5, -1 / 6, 1 / 6, 0.5]))
    assert torch.all(track[..., 1] == 0)


@pytest.mark.parametrize("size", [(16, 16), (8, 12), (4, 4)])
def test_shift_frames_computes_what_grid_sample_does_with_its_gradients(size):
    """The separable matrix form against F.grid_sample on a translation grid (bilinear, border,
    align_corners=False), sub-pixel and beyond-the-edge shifts, values and both gradients."""
    from services.denoiser.model import shift_frames

    h, w = size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, h, w, generator=g, requires_grad=True)
    d = (torch.rand(24, 2, generator=g) * 3 - 1.5).requires_grad_(True)  # up to 1.5 half-frames
    theta = torch.zeros(24, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = d
    grid = F.affine_grid(theta, [24, 3, h, w], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = shift_frames(x, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w_out = torch.randn(out.shape, generator=g)
    gx_ref, gd_ref = torch.autograd.grad((ref * w_out).sum(), (x, d))
    gx, gd = torch.autograd.grad((out * w_out).sum(), (x, d))
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gd, gd_ref, atol=1e-3, rtol=1e-4)
    # bf16 in, bf16 out (autocast's dtype), within bf16 rounding of the fp32 result
    out16 = shift_frames(x.detach().bfloat16(), d.detach())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref.detach(), atol=0.05, rtol=0.02)


def test_attention_backend_is_chosen_at_load_time_with_clear_errors():
    import importlib.util

    from services.denoiser import model as m
    from services.denoiser.engine import DenoiserSettings

    has_xformers = importlib.util.find_spec("xformers") is not None
    try:
        assert m.set_attention("auto") == ("xformers" if has_xformers else "sdpa")
        assert m.set_attention("matmul") == "matmul"
        with pytest.raises(ValueError, match="attention must be one of"):
            m.set_attention("flash")
        if not has_xformers:
            with pytest.raises(RuntimeError, match="xformers does not import"):
                m.set_attention("xformers")
        # CPU tensors take plain matmuls whatever the setting
        q, k, v = (torch.randn(2, 128, 32) for _ in range(3))
        ref = m._attend(q, k, v, heads=4)
        m.set_attention("sdpa")
        assert torch.equal(m._attend(q, k, v, heads=4), ref)
    finally:
        m.set_attention("sdpa")
    with pytest.raises(ValueError, match="attention must be one of"):
        DenoiserSettings(attention="flash").validate()
