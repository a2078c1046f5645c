"""The shared diffusion backbone (``nn/backbone.py``): loading, latents, text, pretraining."""

from __future__ import annotations

import json

import pytest
import torch

from defectforge.config import ConfigError
from defectforge.nn.backbone import BACKBONE_PRESETS, MASK_CAPTION, Backbone, BackboneConfig

PRODUCTS = ("fabric", "tile")
DEFECTS = ("hole", "scratch", "stain")


def _tiny(**overrides) -> Backbone:
    torch.manual_seed(0)
    return Backbone(BackboneConfig(**{**BACKBONE_PRESETS["tiny"], **overrides}), PRODUCTS, 32)


def _batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    product = torch.arange(n) % 2
    image = torch.stack([torch.stack([(xx / 31.0) * (1 - p) + (yy / 31.0) * p] * 3) for p in product.tolist()])
    image = image * 2 - 1 + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    mask = torch.zeros(n, 32, 32, dtype=torch.long)
    mask[:, 10:20, 12:18] = 1
    return {"image": image, "mask": mask, "product": product, "defect": torch.arange(n) % 4}


def test_pixel_unshuffle_latents_are_exact():
    b = _tiny()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = b.encode(x)
    assert z.shape == (3, 12, 16, 16) and b.latent_size == 16 and b.latent_channels == 12
    assert torch.equal(b.decode(z), x)
    assert sum(p.numel() for n, p in b.named_parameters() if "vae" in n) == 0  # nothing to train


def test_captions_never_name_a_defect_type():
    """Pretraining sees the product and whether the image is defective, never which defect."""
    b = _tiny(mask_fraction=0.5, cond_dropout=0.2)
    b.record_captions = True
    for seed in range(6):
        b.pretraining_loss(_batch(8, seed))
    seen = set(b.captions_seen)
    assert seen <= {"", MASK_CAPTION, "a photo of fabric", "a photo of tile", "a photo of a defective fabric",
                    "a photo of a defective tile"}
    assert {MASK_CAPTION, "", "a photo of a defective tile", "a photo of fabric"} <= seen
    assert not any(d in c for c in b.captions_seen for d in DEFECTS)
    # rules by hand: good rows never become masks; with mask_fraction 1 every defective row does
    prompts = b.pretraining_prompts(torch.tensor([0, 1, 1]), torch.tensor([0, 2, 0]),
                                    torch.tensor([False, True, False]), torch.tensor([False, False, True]))
    assert prompts == ["a photo of fabric", MASK_CAPTION, ""]


def test_prediction_conversions_by_hand():
    """to_eps / to_x0 recover the noise and the clean latent from each parameterisation's target."""
    for kind in ("epsilon", "v_prediction", "sample"):
        b = _tiny(prediction_type=kind)
        # float64: at t = 999 (alpha_bar ~ 1e-8 on the cosine schedule) x0 from eps amplifies float32
        # rounding ~1e4-fold; the algebra is what is checked here
        z0, eps = torch.randn(4, 12, 16, 16, dtype=torch.float64), torch.randn(4, 12, 16, 16, dtype=torch.float64)
        t = torch.tensor([0, 10, 500, 999])
        ab = b.noise_scheduler.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        torch.testing.assert_close(b.noise_scheduler.add_noise(z0.float(), eps.float(), t), z_t.float())
        pred = b.target(z0, eps, t)
        torch.testing.assert_close(b.to_eps(pred, z_t, t), eps)
        torch.testing.assert_close(b.to_x0(pred, z_t, t), z0)


def test_min_snr_weights_by_hand():
    """Min-SNR-gamma: the epsilon loss weighted by min(SNR, gamma) / SNR, so for an x0 target the
    weight is min(SNR, gamma) and for v min(SNR, gamma) / (SNR + 1); the loss is the weighted mean
    per row while ``backbone_mse`` stays the plain MSE."""
    t = torch.tensor([0, 300, 700, 999])
    for kind in ("epsilon", "v_prediction", "sample"):
        b = _tiny(prediction_type=kind, min_snr_gamma=5.0)
        ab = b.noise_scheduler.alphas_cumprod[t].double()
        snr = ab / (1 - ab)
        capped = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
        expected = {"epsilon": capped / snr, "v_prediction": capped / (snr + 1), "sample": capped}[kind]
        torch.testing.assert_close(b.min_snr_weights(t).double(), expected, rtol=1e-4, atol=1e-6)
    assert snr[0] > 5 > snr[-1]  # both sides of the cap are exercised
    plain, weighted = _tiny(), _tiny(min_snr_gamma=5.0)
    torch.manual_seed(1)
    a = plain.pretraining_loss(_batch())
    torch.manual_seed(1)
    w = weighted.pretraining_loss(_batch())
    torch.testing.assert_close(a["backbone_mse"], w["backbone_mse"])  # same draws, same plain MSE
    assert not torch.allclose(a["loss"], w["loss"])
    # How the weights enter: each row's own MSE times its weight, averaged over the batch. With
    # one-hot weights e_i the loss is row i's MSE / n: the n losses differ and sum to the plain MSE.
    n = 8
    losses = []
    for i in range(n):
        weighted.min_snr_weights = lambda t, i=i: torch.nn.functional.one_hot(torch.tensor(i), n).float()
        torch.manual_seed(1)
        losses.append(weighted.pretraining_loss(_batch())["loss"])
    torch.testing.assert_close(torch.stack(losses).sum(), a["backbone_mse"])
    assert torch.stack(losses).std() > 0.01 * a["backbone_mse"] / n
    weighted.min_snr_weights = lambda t: torch.full((n,), 2.0)
    torch.manual_seed(1)
    torch.testing.assert_close(weighted.pretraining_loss(_batch())["loss"], 2 * a["backbone_mse"])


def test_mask_weight_weights_the_defect_pixels_of_mask_rows_only():
    """``mask_weight`` k: the squared error of a row drawn as its mask counts k times on the defect
    pixels (+1 in the exact unshuffle latent), once elsewhere; photo rows and the plain
    ``backbone_mse`` are unchanged. Checked against the loss recomputed by hand."""
    b = _tiny(mask_fraction=1.0, cond_dropout=0.0, mask_weight=4.0)
    batch = _batch(8)
    as_mask = batch["defect"] > 0  # mask_fraction 1: every defective row is drawn as its mask
    mask_images = (batch["mask"] > 0).float().unsqueeze(1).expand(-1, 3, -1, -1) * 2 - 1
    w = b.mask_pixel_weights(b.encode(torch.where(as_mask.view(-1, 1, 1, 1), mask_images, batch["image"])), as_mask)
    assert torch.equal(w[~as_mask], torch.ones_like(w[~as_mask]))  # photo rows: plain
    defect_share = (batch["mask"] > 0).float().mean()
    torch.testing.assert_close(w[as_mask].eq(4.0).float().mean(), defect_share)  # 60 of 1024 pixels
    assert set(w.unique().tolist()) == {1.0, 4.0}
    # the loss by hand: same draws (seeded) through the plain config give the unweighted errors
    plain = _tiny(mask_fraction=1.0, cond_dropout=0.0)
    captured = {}
    real_target = plain.target

    def spy(z0, noise, t):
        captured["target"] = real_target(z0, noise, t)
        return captured["target"]

    plain.target = spy
    real_denoise = plain.caption_denoise

    def spy_denoise(*args):
        captured["pred"] = real_denoise(*args)
        return captured["pred"]

    plain.caption_denoise = spy_denoise
    torch.manual_seed(3)
    a = plain.pretraining_loss(batch)
    torch.manual_seed(3)
    weighted = b.pretraining_loss(batch)
    err = (captured["pred"] - captured["target"]) ** 2
    torch.testing.assert_close(weighted["backbone_mse"], a["backbone_mse"])  # same parameters and draws: same plain MSE
    torch.testing.assert_close(weighted["loss"], (err * w).mean(), rtol=1e-5, atol=1e-7)
    assert weighted["loss"] > a["loss"]


def test_token_embeddings_splice_into_the_text_encoder():
    """Textual inversion's splice point: unedited rows give the plain encoding; an edited row
    changes the states from its position on (causal encoder), not before it."""
    b = _tiny()
    prompts = ["a photo of fabric"]
    rows = b.token_embeddings(prompts)
    torch.testing.assert_close(b.encode_text(prompts, token_embeds=rows), b.encode_text(prompts))
    edited = rows.clone()
    edited[0, 5] += 1.0
    out, plain = b.encode_text(prompts, token_embeds=edited), b.encode_text(prompts)
    torch.testing.assert_close(out[0, :5], plain[0, :5])
    assert not torch.allclose(out[0, 5:], plain[0, 5:])
    with pytest.raises(ValueError, match="do not match"):
        b.encode_text(prompts * 2, token_embeds=rows)


@pytest.mark.slow
def test_pretraining_loss_falls():
    b = _tiny()
    batch = _batch(8)
    opt = torch.optim.AdamW(b.parameters(), lr=2e-3)

    def held_out() -> float:  # the same noise and timesteps before and after
        torch.manual_seed(123)
        with torch.no_grad():
            return float(torch.stack([b.pretraining_loss(batch)["loss"] for _ in range(4)]).mean())

    before = held_out()
    torch.manual_seed(0)
    for _ in range(40):
        loss = b.pretraining_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert after < 0.7 * before, (before, after)


# ------------------------------------------------------------------------ loading from a folder
def test_sd_folder_loads_and_denoises_like_the_directly_loaded_unet(sd_folder):
    from diffusers import UNet2DConditionModel

    b = Backbone(BackboneConfig(path=str(sd_folder)), PRODUCTS, 32)
    assert b.source == "folder" and b.latent_size == 8 and b.latent_channels == 4
    assert b.stages() == [] and b.trainable_modules() == {} and b.saved_modules() == {}
    assert not any(p.requires_grad for p in b.parameters())  # frozen
    direct = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    states = b.encode_text(["a photo of fabric", ""])
    assert states.shape == (2, 40, 24)
    torch.testing.assert_close(b.denoise(z, t, states), direct(z, t, encoder_hidden_states=states).sample)
    assert b.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 8, 8)
    assert b.generate(["a photo of fabric"], seed=0, steps=2).shape == (1, 3, 32, 32)


def test_sd_folder_missing_part_or_bad_keys_is_named(sd_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no-vae"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match=r"lacks vae/"):
        Backbone(BackboneConfig(path=str(broken)), PRODUCTS, 32)

    def edited(name: str, part: str, edit) -> str:  # a copy whose <part> weights went through edit()
        folder = tmp_path / name
        shutil.copytree(sd_folder, folder)
        [weights] = (folder / part).glob("*.safetensors")
        save_file(edit(load_file(str(weights))), str(weights))
        return str(folder)

    extra = edited("extra-key", "unet", lambda state: {**state, "surprise.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"unexpected surprise\.weight"):
        Backbone(BackboneConfig(path=extra), PRODUCTS, 32)

    gone = ""

    def drop_first(state):
        nonlocal gone
        gone = sorted(state)[0]
        return {k: v for k, v in state.items() if k != gone}

    missing = edited("missing-key", "text_encoder", drop_first)
    with pytest.raises(ConfigError, match=rf"text_encoder.*missing {gone}"):
        Backbone(BackboneConfig(path=str(missing)), PRODUCTS, 32)


# -------------------------------------------------------------- copied from a defectforge checkpoint
def test_copied_backbone_is_bit_identical_and_architecture_checked(tmp_path):
    from safetensors.torch import save_file

    trained = _tiny()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(ckpt / "backbone.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"method": "some-method", "method_config": {
        "backbone": trained.config.model_dump(mode="json")}}))

    torch.manual_seed(1)  # other random initial weights
    copy = Backbone(BackboneConfig(**{**BACKBONE_PRESETS["tiny"], "path": str(ckpt)}), PRODUCTS, 32)
    assert copy.source == "copied" and copy.stages() == [] and "backbone" in copy.saved_modules()
    copy.initialise()
    for (name, a), (_, b) in zip(trained.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name

    wrong = Backbone(BackboneConfig(**{**BACKBONE_PRESETS["tiny"], "path": str(ckpt), "text_dim": 16,
                                       "text_heads": 2}), PRODUCTS, 32)
    with pytest.raises(ConfigError, match=r"text_dim \(ours 16, its 32\)"):
        wrong.initialise()


def test_trained_here_has_the_backbone_stage():
    b = _tiny()
    [stage] = b.stages()
    assert stage.name == "backbone" and stage.rows == "balanced" and stage.modules == ("backbone",)
    assert b.trainable_modules() == {"backbone": b} and b.saved_modules() == {"backbone": b}


def test_bad_sizes_fail_naming_the_field():
    with pytest.raises(ConfigError, match="latent_downsample"):
        Backbone(BackboneConfig(**{**BACKBONE_PRESETS["tiny"], "latent_downsample": 4}), PRODUCTS, 30)
    with pytest.raises(ConfigError, match="attention_resolution"):
        Backbone(BackboneConfig(**{**BACKBONE_PRESETS["tiny"], "attention_resolution": 2}), PRODUCTS, 32)
    with pytest.raises(ValueError, match="text_heads"):
        BackboneConfig(text_dim=30, text_heads=4)


def test_dit_backbone_draws_from_captions_with_guidance_by_hand(monkeypatch):
    """``generate`` works for ``arch: dit`` too (the pretraining check draws from both archs): the
    caption reaches the DiT as pretraining gives it, and guidance is u + g (c - u) of one batched
    call of [caption; empty caption] per step."""
    torch.manual_seed(0)
    b = Backbone(BackboneConfig(**{**BACKBONE_PRESETS["tiny"], "arch": "dit"}), PRODUCTS, 32, dit_groups=(1, 1, 1))
    with torch.no_grad():  # the prompt projections start at zero (the caption would not matter yet),
        # and adaLN-Zero's layers (the output would be zero): values as after some training
        for layer in [*b.transformer.prompt_proj.values(), *b.transformer.adaln_zero_layers()]:
            for p in layer.parameters():
                p.normal_(0, 0.2)
    a1 = b.generate(["a photo of fabric"] * 2, seed=3, steps=3)
    a2 = b.generate(["a photo of fabric"] * 2, seed=3, steps=3)
    assert a1.shape == (2, 3, 32, 32) and torch.equal(a1, a2)
    assert not torch.allclose(a1, b.generate([MASK_CAPTION] * 2, seed=3, steps=3))
    calls = []
    real = b.caption_denoise

    def recording(z, t, cond):
        out = real(z, t, cond)
        calls.append((z.shape[0], out))
        return out
    monkeypatch.setattr(b, "caption_denoise", recording)
    sched_steps = []
    real_step = Backbone.step
    monkeypatch.setattr(b, "step", lambda sched, sampler, pred, t, z, g: sched_steps.append(pred) or
                        real_step(sched, sampler, pred, t, z, g))
    b.generate(["a photo of fabric"] * 2, seed=3, steps=3, guidance=4.0)
    assert [n for n, _ in calls] == [4, 4, 4]  # one batched call per step
    for (_, out), pred in zip(calls, sched_steps):
        c, u = out.chunk(2)
        torch.testing.assert_close(pred, u + 4.0 * (c - u))


def test_backbone_check_binarises_and_measures_masks_by_hand():
    """``backbone_quality``'s mask figures on drawn images given by hand: binarised by channel mean
    > 0 (AnomalyDiffusion's rule), non-empty share and mean area against the real masks'."""
    import numpy as np

    from defectforge.evaluate.backbone_check import backbone_quality

    class Drawn:
        """A stand-in backbone: "a defect mask" -> 4 images (one empty; areas 8 (two squares), 8
        and 15 of 64 pixels), anything else -> flat grey."""

        def eval(self):
            return self

        def generate(self, prompts, seed, steps, guidance):
            out = -torch.ones(len(prompts), 3, 8, 8)
            if prompts[0] == MASK_CAPTION:
                out[1, :, :2, :2] = 1
                out[1, :, 4:6, 4:6] = 1  # and a second, separate square: 2 components
                out[2, :, :2, :4] = 1
                out[3, :, :4, :4] = 0.5
                out[3, 0, 0, 0] = -3  # channel mean -1/3 + ... < 0: this pixel stays background
            return out

    class Flat:
        name = "flat"

        def features(self, images):
            return np.asarray(images, np.float64).reshape(len(images), -1)[:, :4] + np.arange(len(images))[:, None]

    real_mask = np.zeros((8, 8), np.uint8)
    real_mask[:4, :4] = 1  # area 16 / 64
    good = np.zeros((8, 8, 3), np.uint8)
    real = {"test": [{"product": "fabric", "defect": "good", "image": good}] * 8,
            "few_shot": [{"product": "fabric", "defect": "hole", "mask": real_mask * 1}], "good_train": []}
    rep = backbone_quality(Drawn(), real, ["fabric"], n=4, extractor=Flat())
    assert rep["mask_nonempty_rate"] == 0.75
    assert rep["mask_area"] == pytest.approx((0 + 8 + 8 + 15) / 64 / 4)
    assert rep["mask_area_real"] == 0.25 and rep["mask_area_ratio"] == pytest.approx(rep["mask_area"] / 0.25)
    assert rep["mask_components"] == pytest.approx(4 / 3) and rep["mask_components_real"] == 1.0
    assert np.isfinite(rep["kid_randfeat/fabric"])
