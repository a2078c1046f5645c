"""DefectDiffu (``methods/defect_diffu.py``) and the backbone's ``arch: dit``: prompt dropping,
double-free guidance, AAL, isodata masks, stages, a DiT folder, train -> sample -> checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectforge.config import ConfigError, resolve_config
from defectforge.methods.base import Conditions, GeneratorContext, SamplingOptions, build_generator, load_generator
from defectforge.methods.defect_diffu import (
    GOOD,
    DefectDiffu,
    aal_weight,
    double_free,
    draw_prompts,
    isodata,
    prompt_d,
)

CTX = GeneratorContext(("fabric", "tile"), {"fabric": ("hole", "scratch"), "tile": ("crack",)}, 64)
OPTIONS = SamplingOptions(sampler="ddim", steps=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why


def _gen(*overrides: str, ctx: GeneratorContext = CTX) -> DefectDiffu:
    torch.manual_seed(0)
    cfg = resolve_config(method="defect-diffu", preset="tiny", overrides=list(overrides))
    return build_generator(cfg.method, ctx)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 64, 64, dtype=torch.long)
    mask[:2, 21:29, 18:37] = 1
    return {"image": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1, "mask": mask,
            "product": torch.tensor([0, 1, 0, 1]), "defect": torch.tensor([2, 1, 0, 0])}


def _randomise_new_layers(gen: DefectDiffu, seed: int = 3) -> None:
    """The prompt projections and cross-attention outputs start at zero (the prompts would not
    matter yet), and so do adaLN-Zero's modulation and final layer (the output would be zero):
    give them values, as after some training, so that the three guidance calls differ."""
    g = torch.Generator().manual_seed(seed)
    dit = gen.backbone.transformer
    layers = [*dit.prompt_proj.values()] + [b.attn2.to_out[0] for b in dit.transformer_blocks if b.attn2 is not None]
    layers += dit.adaln_zero_layers()
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_config_stages_and_modules():
    gen = _gen()
    assert gen.backbone.config.arch == "dit" and gen.backbone.trained_here
    assert gen.backbone.transformer.block_groups == ("background",) * 3 + ("defect",) * 3 + ("fusion",) * 2
    assert [(s.name, s.modules, s.rows) for s in gen.stages()] == [
        ("backbone", ("backbone",), "balanced"), ("diffu", ("backbone.transformer",), "balanced")]
    assert gen.trainable_modules()["backbone.transformer"] is gen.backbone.transformer
    assert set(gen.saved_modules()) == {"backbone"} and not hasattr(gen.backbone, "unet")
    cfg = gen.config
    assert (cfg.lambda_mask, cfg.alpha) == (0.2, 0.001)
    assert {"background_blocks", "defect_blocks", "fusion_blocks"} <= set(cfg.pretraining()["fields"])
    with pytest.raises(ConfigError, match="arch must be 'dit'"):
        resolve_config(method="defect-diffu", preset="tiny", overrides=["method.backbone.arch=unet"])
    with pytest.raises(ConfigError, match="arch: 'dit' is DefectDiffu"):
        build_generator(resolve_config(method="anomaly-diffusion", preset="tiny",
                                       overrides=["method.backbone.arch=dit"]).method, CTX)


def test_dropping_rates_follow_algorithm_1():
    """Acceptance 1 over 10^4 draws (± 0.02): defect-free rows drop c_p with p1 (c_d always
    "good"); defective rows get c_d = "good" with p2 and drop c_p with 1 - (1 - p1)^2,
    independently; c_f is built from the words that are left."""
    n, p1, p2 = 10_000, 0.3, 0.2
    g = torch.Generator().manual_seed(0)
    good = draw_prompts(["tile"] * n, [None] * n, p1, p2, g)
    bad = draw_prompts(["tile"] * n, ["crack"] * n, p1, p2, g)
    assert np.mean(good.dropped_p) == pytest.approx(p1, abs=0.02)
    assert all(good.good_d) and set(good.c_d) == {prompt_d(GOOD)}
    assert np.mean(bad.good_d) == pytest.approx(p2, abs=0.02)
    assert np.mean(bad.dropped_p) == pytest.approx(1 - (1 - p1) ** 2, abs=0.02)
    both = np.mean(np.array(bad.good_d) & np.array(bad.dropped_p))
    assert both == pytest.approx(p2 * (1 - (1 - p1) ** 2), abs=0.02)
    for draw in (good, bad):
        for c_p, c_d, c_f, dropped, swapped in zip(draw.c_p, draw.c_d, draw.c_f, draw.dropped_p, draw.good_d):
            assert c_p == ("" if dropped else "a photo of tile")
            assert c_d == ("a photo of good" if swapped else "a photo of crack")
            assert c_f == "a photo of " + ("good" if swapped else "crack") + ("" if dropped else " tile")


def test_double_free_guidance_equals_a_hand_computation_from_three_recorded_calls(monkeypatch):
    """Acceptance 2: the prediction handed to the scheduler is ε(c_g,∅) + w_p(ε(c_g,c_p) - ε(c_g,∅))
    + w_d(ε(c_d,∅) - ε(c_g,∅)) of the three recorded DiT calls (the three conditionings checked);
    with w_p = w_d = 0 it is ε(c_g,∅) exactly."""
    gen = _gen()
    _randomise_new_layers(gen)
    calls, stepped = [], []
    predict, step = gen.predict, gen.backbone.step

    def record_predict(z, t, cond):
        out = predict(z, t, cond)
        calls.append((cond, out.sample))
        return out

    def record_step(sched, sampler, pred, t, z, g):
        stepped.append(pred)
        return step(sched, sampler, pred, t, z, g)

    monkeypatch.setattr(gen, "predict", record_predict)
    monkeypatch.setattr(gen.backbone, "step", record_step)
    products, defects = ["fabric", "tile"], ["scratch", "crack"]
    for w_p, w_d in ((2.5, 1.5), (0.0, 0.0)):
        calls.clear(), stepped.clear()
        options = SamplingOptions(steps=1, method={"w_p": w_p, "w_d": w_d})
        gen.generate(products, defects, seed=0, options=options)
        assert len(calls) == 3 and len(stepped) == 1
        (c_u, u), (c_p, p), (c_d, d) = calls
        assert not torch.allclose(u, p) and not torch.allclose(u, d)
        hand = u + w_p * (p - u) + w_d * (d - u)
        torch.testing.assert_close(stepped[0], hand, rtol=0, atol=1e-6)
        if w_p == w_d == 0:
            assert torch.equal(stepped[0], u)
    # which conditioning each call had: ∅ product in calls 1 and 3, "good" defect in calls 1 and 2
    empty = gen.encode([""] * 2, [prompt_d(GOOD)] * 2, [prompt_d(GOOD)] * 2, [GOOD] * 2)
    assert torch.equal(c_u.pooled["background"], empty.pooled["background"])
    assert torch.equal(c_d.pooled["background"], empty.pooled["background"])
    assert torch.equal(c_p.states, c_u.states) and not torch.equal(c_d.states, c_u.states)
    assert not torch.equal(c_p.pooled["background"], c_u.pooled["background"])
    # double_free itself on numbers
    one = torch.ones(1)
    assert float(double_free(one * 1, one * 3, one * 7, 2.0, 0.5)) == 1 + 2 * 2 + 0.5 * 6


def test_aal_weight_on_hand_made_maps():
    """Acceptance 3: R = clamp(Σ(1-m)Map / (Σ m·Map + α), 2, 8), detached."""
    mask = torch.zeros(4, 4, 4)
    mask[:, 1:3, 1:3] = 1
    maps = torch.zeros(4, 4, 4)
    maps[0] = mask[0] * 0.25  # all attention inside: Rat = 0 -> 2
    maps[1] = (1 - mask[1]) / 12  # all outside: Rat = 1 / α -> 8
    maps[2, 1, 1], maps[2, 0, 0], maps[2, 3, 3], maps[2, 0, 3] = 0.4, 0.5, 0.5, 0.5  # Rat = 1.5 / 0.401
    maps[3, 1, 1], maps[3, 0, 0] = 0.1, 0.5  # Rat = 0.5 / 0.101 ≈ 4.95
    maps.requires_grad_(True)
    r = aal_weight(maps, mask, 0.001)
    assert not r.requires_grad
    expected = torch.tensor([2.0, 8.0, 1.5 / 0.401, 0.5 / 0.101])
    torch.testing.assert_close(r, expected)
    assert bool(((r >= 2) & (r <= 8)).all())
    rand = aal_weight(torch.rand(64, 8, 8), (torch.rand(64, 8, 8) > 0.7).float(), 0.001)
    assert bool(((rand >= 2) & (rand <= 8)).all())


def test_isodata_thresholds_a_bimodal_toy_map():
    rng = np.random.default_rng(0)
    truth = np.zeros((32, 32), bool)
    truth[8:20, 10:26] = True
    values = np.where(truth, 0.8, -0.6) + rng.normal(0, 0.05, truth.shape)
    t = isodata(values)
    assert -0.5 < t < 0.7
    # the fixed point: the mean of the two class means
    assert t == pytest.approx(0.5 * (values[values <= t].mean() + values[values > t].mean()), abs=1e-6)
    assert np.array_equal(values > t, truth)
    assert isodata(np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.5)
    assert not (np.full((4, 4), 0.3) > isodata(np.full((4, 4), 0.3))).any()  # a constant map: empty mask


def test_defect_tokens_are_the_defect_word():
    gen = _gen("method.defect_names={'tile/crack': 'crack line'}")
    tokens = gen.defect_tokens(["hole"])
    ids = gen.backbone.tokenize([prompt_d("hole")])[0]
    assert gen.backbone.tokenizer.decode(ids[tokens[0]]).strip() == "hole"
    assert gen.word("tile", "crack") == "crack line" and gen.word("fabric", "hole") == "hole"


@pytest.mark.parametrize("stage", ["backbone", "diffu"])
def test_only_the_stages_modules_get_gradients(stage):
    """Stage diffu: the DiT and its new layers (mask head, prompt projections, cross-attention)
    learn, the text encoder does not; stage backbone: DiT and text encoder (the caption reaches it
    through the pooled prompts and the cross-attention)."""
    from defectforge.train.loop import _set_trainable

    gen = _gen()
    # at initialisation the prompt projections and cross-attention outputs are zero, so no gradient
    # reaches the text encoder yet: give them values first (as after a few steps)
    _randomise_new_layers(gen)
    [spec] = [s for s in gen.stages() if s.name == stage]
    _set_trainable(gen, spec.modules)
    losses = gen.training_step(_batch(), stage)
    losses["loss"].backward()
    dit = gen.backbone.transformer
    got = {n for n, p in gen.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(n.startswith("backbone.") for n in got)
    text = {n for n in got if ".text_encoder." in n}
    if stage == "diffu":
        assert not text and not any(p.requires_grad for p in gen.backbone.text_encoder.parameters())
        assert {"aal", "mask_mse", "diffu_mse"} <= set(losses) and 2 <= float(losses["aal_r"]) <= 8
        for part in (dit.mask_head, dit.prompt_proj["background"], dit.prompt_proj["defect"],
                     dit.prompt_proj["fusion"]):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    else:
        assert text
        assert all(p.grad is None for p in dit.mask_head.parameters())  # pretraining has no mask loss


def test_pretraining_feeds_the_caption_to_every_group(monkeypatch):
    gen = _gen()
    seen = []
    forward = gen.backbone.transformer.forward

    def spy(latent, timestep, pooled, states, **kwargs):
        seen.append(pooled)
        return forward(latent, timestep, pooled, states, **kwargs)

    monkeypatch.setattr(gen.backbone.transformer, "forward", spy)
    gen.backbone.record_captions = True
    gen.training_step(_batch(), "backbone")
    [pooled] = seen
    assert torch.equal(pooled["background"], pooled["defect"]) and torch.equal(pooled["fusion"], pooled["defect"])
    assert not any(d in c for c in gen.backbone.captions_seen for d in ("hole", "scratch", "crack"))


def test_tiny_train_sample_and_checkpoint_round_trip(tmp_path):
    gen = _gen()
    spec = gen.stages()[-1]
    params = [p for m in spec.modules for p in gen.trainable_modules()[m].parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        gen.training_step(_batch(), "diffu")["loss"].backward()
        opt.step()
    gen.eval()
    cond = Conditions(["fabric", "tile", "fabric"], ["scratch", "crack", "hole"])
    batch = gen.sample(3, cond, seed=5, options=OPTIONS)
    assert batch.images.shape == (3, 64, 64, 3) and batch.images.dtype == np.uint8
    assert batch.masks.shape == (3, 64, 64) and batch.masks.dtype == np.uint8
    for mask, class_id in zip(batch.masks, (2, 1, 1)):
        assert set(np.unique(mask)) <= {0, class_id}
    assert len(batch.extras["mask_thresholds"]) == 3
    loaded = load_generator(gen.save_pretrained(tmp_path / "ckpt", sampling=OPTIONS))
    again = loaded.sample(3, cond, seed=5)
    np.testing.assert_array_equal(batch.images, again.images)
    np.testing.assert_array_equal(batch.masks, again.masks)
    with pytest.raises(KeyError, match="fabric/hole"):
        gen.sample(1, Conditions(["tile"], ["hole"]), seed=0, options=OPTIONS)


def _dit_folder(sd_folder):
    """A DiT layout: the SD fixture's vae/, text_encoder/, tokenizer/ and a tiny DiT in transformer/."""
    import shutil

    from diffusers import DiTTransformer2DModel

    shutil.rmtree(sd_folder / "unet")
    torch.manual_seed(1)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                          num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10
                          ).save_pretrained(sd_folder / "transformer")
    return sd_folder


def test_dit_folder_loads_trains_the_dit_and_names_a_bad_part(sd_folder):
    """Acceptance 4: a test-written tiny DiTTransformer2DModel + VAE folder loads (its DiT is module
    ``dit``, trained in stage diffu and saved; nothing else is); a missing part or an extra key
    fails naming it."""
    from safetensors.torch import load_file, save_file

    root = _dit_folder(sd_folder)
    ctx = GeneratorContext(("tile",), {"tile": ("crack",)}, 32)
    groups = ["method.background_blocks=1", "method.defect_blocks=1", "method.fusion_blocks=1"]
    gen = _gen(f"method.backbone.path={root}", *groups, ctx=ctx)
    assert gen.backbone.source == "folder" and gen.backbone.noise_scheduler.config.prediction_type == "epsilon"
    assert [(s.name, s.modules) for s in gen.stages()] == [("diffu", ("dit",))]
    assert set(gen.saved_modules()) == {"dit"} and gen.saved_modules()["dit"] is gen.backbone.transformer
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "mask": torch.zeros(2, 32, 32, dtype=torch.long),
             "product": torch.tensor([0, 0]), "defect": torch.tensor([1, 0])}
    batch["mask"][0, 8:20, 8:16] = 1
    from defectforge.train.loop import _set_trainable

    _set_trainable(gen, ("dit",))
    gen.training_step(batch, "diffu")["loss"].backward()
    got = {n for n, p in gen.named_parameters() if p.grad is not None}
    assert got and all(n.startswith("backbone.transformer.") for n in got)
    out = gen.eval().sample(1, Conditions(["tile"], ["crack"]), seed=0, options=OPTIONS)
    assert out.images.shape == (1, 32, 32, 3)

    with pytest.raises(ConfigError, match="num_layers = 3"):
        _gen(f"method.backbone.path={root}", ctx=ctx)  # the tiny preset's 3/3/2 does not fit
    [weights] = sorted((root / "transformer").glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({**state, "transformer_blocks.0.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ConfigError, match="transformer_blocks.0.extra.weight"):
        _gen(f"method.backbone.path={root}", *groups, ctx=ctx)
    (root / "transformer").rename(root / "elsewhere")
    with pytest.raises(ConfigError, match="lacks transformer/"):
        _gen(f"method.backbone.path={root}", *groups, ctx=ctx)
    assert json.loads((root / "elsewhere" / "config.json").read_text())["num_layers"] == 3


def test_sampled_mask_is_the_isodata_binarised_mean_of_the_last_window_of_defect_calls(monkeypatch):
    """The mask averages the defect-conditioned call's mask latent over the last ``mask_window``
    steps (not the other calls', not earlier steps), decodes it, and thresholds it with isodata."""
    gen = _gen()
    _randomise_new_layers(gen)
    with torch.no_grad():  # a mask head whose output varies, so that which steps are averaged matters
        for p in gen.backbone.transformer.mask_head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    masks_seen = []
    predict = gen.predict

    def record(z, t, cond):
        out = predict(z, t, cond)
        masks_seen.append(out.mask_latent)
        return out

    monkeypatch.setattr(gen, "predict", record)
    options = SamplingOptions(steps=4, method={"mask_window": 2, "mask_floor": None})  # isodata alone
    _, masks, thresholds = gen.generate(["fabric", "tile"], ["hole", "crack"], seed=2, options=options)
    assert len(masks_seen) == 12  # 4 steps x 3 calls (unconditional, product, defect)
    defect_calls = masks_seen[2::3]
    mean = (defect_calls[2] + defect_calls[3]) / 2
    grey = gen.backbone.decode(mean).mean(1).numpy()
    expected = [isodata(g) for g in grey]
    assert thresholds == pytest.approx(expected)
    np.testing.assert_array_equal(masks, np.stack([g > t for g, t in zip(grey, expected)]).astype(np.uint8))
    assert masks.any() and not masks.all()
    other = gen.backbone.decode((defect_calls[0] + defect_calls[1]) / 2).mean(1).numpy()
    assert not np.array_equal(masks, np.stack([g > isodata(g) for g in other]).astype(np.uint8))

    # mask_floor: the threshold is max(isodata, floor); a floor above the map's maximum empties it
    for floor in (float(grey.mean()), float(grey.max()) + 0.1):
        masks_seen.clear()
        floored = SamplingOptions(steps=4, method={"mask_window": 2, "mask_floor": floor})
        _, got, got_t = gen.generate(["fabric", "tile"], ["hole", "crack"], seed=2, options=floored)
        want = [max(t, floor) for t in expected]
        assert got_t == pytest.approx(want)
        np.testing.assert_array_equal(got, np.stack([g > t for g, t in zip(grey, want)]).astype(np.uint8))
    assert not got.any()


def test_the_default_mask_floor_empties_a_map_without_a_white_side(monkeypatch):
    """A mask head that has not learned to draw a defect leaves every decoded value near the
    target's black; isodata alone splits that noise floor into a mask over much of the image, the
    default floor (mid-grey 0) gives an empty mask instead (measured on a 300-step laptop model,
    2026-12-07: the map's maximum -0.65, isodata's masks 55-78 % of the image)."""
    import dataclasses

    gen = _gen()
    assert gen.config.mask_floor == 0.0
    predict = gen.predict
    noise = -0.97 + 0.05 * torch.randn(1, gen.backbone.latent_channels, gen.backbone.latent_size,
                                       gen.backbone.latent_size, generator=torch.Generator().manual_seed(0))
    # the mask head draws the noise floor (the pixel-unshuffle latent decodes to the same values)
    monkeypatch.setattr(gen, "predict", lambda z, t, c: dataclasses.replace(predict(z, t, c), mask_latent=noise))
    grey = gen.backbone.decode(noise).mean(1).numpy()[0]
    assert grey.max() < 0
    official = SamplingOptions(steps=2, method={"mask_floor": None})
    _, masks, thresholds = gen.generate(["fabric"], ["hole"], seed=0, options=official)
    assert thresholds == pytest.approx([isodata(grey)]) and masks.mean() > 0.3  # half the noise
    _, masks, thresholds = gen.generate(["fabric"], ["hole"], seed=0, options=SamplingOptions(steps=2))
    assert thresholds == [0.0] and not masks.any()


def test_diffu_trains_on_defect_free_rows_also_on_a_loaded_backbone(synth_root, tmp_path):
    """Stage diffu's balanced rows need the defect-free training images also when the backbone
    comes from ``backbone.path`` (no backbone stage then asks for them); without them training
    stopped with 'no defect-free image'."""
    from defectforge.train.data import load_training_data

    cfg = resolve_config(method="defect-diffu", preset="tiny", overrides=[
        f"data.path={synth_root}", f"method.backbone.path={tmp_path}"])
    assert not cfg.data.train_on_good and cfg.method.trains_on_good()
    defects = {r["defect"] for r in load_training_data(cfg).rows}
    assert "good" in defects and len(defects) > 1


@pytest.mark.slow
def test_zero_shot_from_the_cli_trains_metal_on_its_good_images_and_samples_metal_scratch(
        ray_session, synth_root, tmp_path, capsys):
    """Item 6 from the CLI: ``data.split.zero_shot=[metal]`` trains no metal defect (the run's split
    manifest: its train side holds no metal defect), and the checkpoint samples metal/scratch: its defect
    direction comes from fabric's scratches (Eq. 4 names T and d in no call together)."""
    import json

    from defectforge import cli
    from defectforge.data.arrow import read_parquet

    out = tmp_path / "runs"
    capsys.readouterr()
    code = cli.main(["train", "--method", "defect-diffu", "--data", str(synth_root), "--out", str(out), "--name", "zs",
                     "--mode", "multi-product", "--no-mlflow", "data.split.zero_shot=[metal]",
                     "method.backbone_steps=2", "method.diffu_steps=2", "train.checkpoint_every=2"])
    assert code == 0, capsys.readouterr().err
    run = out / "zs"
    manifest = json.loads(next(run.rglob("split_manifest.json")).read_text())
    assert not [k for k in manifest["train"] if k.startswith("metal/") and k != "metal/good"]
    assert manifest["test"]["metal/scratch"]  # all of them test
    assert [k for k in manifest["train"] if k.startswith("fabric/") and k != "fabric/good"]
    code = cli.main(["generate", "--checkpoint", str(run / "generator"), "--n", "2", "--out", str(tmp_path / "gen"),
                     "--product", "metal", "--defects", "scratch", "--keep-empty", "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    rows = [r for f in sorted((tmp_path / "gen").rglob("*.parquet")) for r in read_parquet(f)]
    assert len(rows) == 2 and {(r["product"], r["defect"]) for r in rows} == {("metal", "scratch")}
