"""AnomalyDiffusion (``methods/anomaly_diffusion.py``): stages, masked loss, blending, AAR, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.config import resolve_config
from defectforge.methods.anomaly_diffusion import AnomalyDiffusion, aar_weights, border_touching
from defectforge.methods.base import Conditions, GeneratorContext, SamplingOptions, build_generator

CTX = GeneratorContext(("fabric", "tile"), {"fabric": ("hole", "scratch"), "tile": ("crack",)}, 64)
OPTIONS = SamplingOptions(sampler="ddim", steps=3)


def _gen(*overrides: str) -> AnomalyDiffusion:
    torch.manual_seed(0)
    cfg = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=list(overrides))
    return build_generator(cfg.method, CTX)


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    mask = torch.zeros(n, 64, 64, dtype=torch.long)
    mask[:, 21:29, 18:37] = 1  # not aligned to the 2 x 2 latent cells on purpose
    return {"image": torch.rand(n, 3, 64, 64) * 2 - 1, "mask": mask, "product": torch.tensor([0, 0, 1, 1])[:n],
            "defect": torch.tensor([1, 2, 1, 1])[:n]}


def test_stages_and_modules():
    gen = _gen()
    assert [(s.name, s.modules, s.rows) for s in gen.stages()] == [
        ("backbone", ("backbone",), "balanced"), ("anomaly", ("anomaly",), "defective"),
        ("mask", ("mask_embedding",), "defective")]
    assert set(gen.saved_modules()) == {"backbone", "anomaly", "mask_embedding"}
    assert len(gen.anomaly["embeddings"]) == 3 and gen.anomaly["embeddings"][0].shape == (2, 32)
    assert gen.config.trains_on_good()


def test_embeddings_restart_at_the_trained_word_when_their_stage_starts():
    """The vectors are built before stage backbone trains the text encoder; each stage restarts
    its own at the word "defect" as the encoder knows it then (textual inversion's starting word)."""
    gen = _gen()
    table = gen.backbone.text_encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight.add_(torch.randn(table.weight.shape, generator=torch.Generator().manual_seed(3)))
    ids = gen.backbone.tokenize(["defect"])[0]
    word = table.weight[ids[ids != gen.backbone.tokenizer.pad_token_id]].mean(0)
    before_mask = [p.detach().clone() for p in gen.mask_embedding]

    def off(vectors: torch.Tensor) -> float:
        return float((vectors - word).abs().max())

    assert off(gen.anomaly["embeddings"][0]) > 0.5  # built from the table before it "trained"
    gen.begin_stage("anomaly")
    spread = 0.05 * float(word.norm())  # the seeded jitter: 1 % of the norm per dimension, a few sigma
    assert all(off(p) < spread for p in gen.anomaly["embeddings"])
    assert torch.equal(gen.anomaly["encoder"].init, word.expand_as(gen.anomaly["encoder"].init))
    assert all(torch.equal(a, b) for a, b in zip(gen.mask_embedding, before_mask))  # not its stage
    gen.begin_stage("mask")
    assert all(off(p) < spread for p in gen.mask_embedding)
    gen.begin_stage("backbone")  # other stages leave the vectors alone
    assert all(off(p) < spread for p in gen.mask_embedding)


@pytest.mark.parametrize("stage", ["anomaly", "mask"])
def test_only_the_stages_modules_get_gradients(stage):
    from defectforge.train.loop import _set_trainable

    gen = _gen()
    [spec] = [s for s in gen.stages() if s.name == stage]
    _set_trainable(gen, spec.modules)
    gen.training_step(_batch(), stage)["loss"].backward()
    trained = {id(p) for m in spec.modules for p in gen.trainable_modules()[m].parameters()}
    got = {id(p) for p in gen.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and got <= trained
    assert all(p.grad is None for p in gen.backbone.parameters())


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_anomaly_loss_has_no_gradient_outside_the_max_pooled_mask(monkeypatch, prediction):
    """Acceptance 1: d loss / d prediction (the predicted noise for an epsilon backbone) is zero
    outside the latent (max-pooled) mask, nonzero inside."""
    gen = _gen(f"method.backbone.prediction_type={prediction}")
    seen = []
    original = gen.backbone.denoise

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        out.retain_grad()
        seen.append(out)
        return out

    monkeypatch.setattr(gen.backbone, "denoise", spy)
    batch = _batch()
    gen.training_step(batch, "anomaly")["loss"].backward()
    grad = seen[0].grad  # B x C x 32 x 32
    latent = torch.nn.functional.max_pool2d(batch["mask"].float().unsqueeze(1), 2)  # B x 1 x 32 x 32
    assert latent[0, 0, 10, 9] == 1 and batch["mask"][0, 20:22, 18:20].sum() == 2  # a half-covered cell counts
    outside = (latent == 0).expand_as(grad)
    assert torch.count_nonzero(grad[outside]) == 0
    assert torch.count_nonzero(grad[~outside]) > 0.9 * (~outside).sum()


def test_blended_sampling_returns_the_normal_image_outside_the_latent_mask():
    """Acceptance 2: with the pixel-unshuffle latent, pixels whose latent cell is outside the mask
    are y exactly (as floats, and as uint8 through ``sample``)."""
    gen = _gen()
    rng = np.random.default_rng(0)
    normal_u8 = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    normal = torch.from_numpy(normal_u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    mask = torch.zeros(2, 64, 64, dtype=torch.uint8)
    mask[:, 20:30, 25:41] = 1
    out = gen.blend_sample(normal, mask, ["fabric", "tile"], [0, 2], seed=1, options=OPTIONS)
    cells = torch.nn.functional.interpolate(torch.nn.functional.max_pool2d(mask.float().unsqueeze(1), 2),
                                            scale_factor=2, mode="nearest").bool().expand_as(out)
    assert torch.equal(out[~cells], normal[~cells])
    assert not torch.allclose(out[cells], normal[cells])  # something was generated inside

    monkey_masks = mask.numpy()
    gen.sample_masks = lambda type_ids, seed, options=None: monkey_masks  # the image step alone
    batch = gen.sample(2, Conditions(["fabric", "tile"], ["hole", "crack"], normal_image=normal_u8), seed=1,
                       options=OPTIONS)
    keep = ~cells[:, 0].numpy()
    assert np.array_equal(batch.images[keep], normal_u8[keep])
    assert set(np.unique(batch.masks[0])) == {0, 1} and set(np.unique(batch.masks[1])) == {0, 1}


def test_aar_weights_by_hand():
    """Acceptance 3 on a 4 x 4 case: 0 outside m and where x0_hat == y, sums to ||m||_1, largest
    where x0_hat is closest to y; the values are ||m||_1 softmax(1/d) computed by hand."""
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 1] = mask[0, 1, 2] = mask[0, 2, 1] = mask[0, 2, 2] = 1
    normal = torch.zeros(1, 1, 4, 4)
    x0 = torch.zeros(1, 1, 4, 4)
    x0[0, 0, 1, 2], x0[0, 0, 2, 1], x0[0, 0, 2, 2] = 1.0, 2.0, 0.5  # d = 1, 4, 0.25; (1, 1) equal: d = 0
    x0[0, 0, 0, 0] = 9.0  # outside the mask: ignored
    w = aar_weights(mask, normal, x0)
    f = torch.tensor([1 / 1.0, 1 / 4.0, 1 / 0.25])
    expected = 4 * torch.softmax(f, 0)
    torch.testing.assert_close(torch.stack([w[0, 1, 2], w[0, 2, 1], w[0, 2, 2]]), expected)
    assert w[0, 1, 1] == 0 and w[0, 0, 0] == 0 and (w * (1 - mask)).abs().sum() == 0
    assert float(w.sum()) == pytest.approx(4.0)
    assert w[0, 2, 2] == w.max()  # closest (d = 0.25)
    assert torch.equal(aar_weights(torch.zeros(1, 4, 4), normal, x0), torch.zeros(1, 4, 4))


def test_recorded_attention_is_scaled_by_the_aar_weight_on_the_embedding_tokens():
    """Acceptance 3, second half: the first cross-attention layer's probabilities with the weight
    equal those without, times the weight (resized to the layer) on the slot tokens only."""
    from defectforge.nn.attention import AttentionControl, install

    gen = _gen()
    bb = gen.backbone
    mask = torch.zeros(2, 64, 64)
    mask[:, 16:40, 16:40] = 1
    states, slots = gen.anomaly_states(["fabric", "tile"], [0, 2], mask)
    weight = torch.rand(2, 64, 64) * mask
    z, t = torch.randn(2, 12, 32, 32), torch.tensor([500, 500])
    runs = []
    for w in (None, weight):
        control = AttentionControl(weight=w, tokens=slots, record=True)
        before = dict(bb.unet.attn_processors)
        install(bb.unet, control)
        with torch.no_grad():
            bb.denoise(z, t, states)
        bb.unet.set_attn_processor(before)
        runs.append(control.maps[0][1])  # B x heads x h x w x T
    plain, scaled = runs
    h = plain.shape[2]
    grid = torch.nn.functional.interpolate(weight[:, None], size=(h, h), mode="bilinear", align_corners=False)[:, 0]
    factor = torch.where(slots[:, None, None, None, :], grid[:, None, :, :, None], torch.ones(()))
    torch.testing.assert_close(scaled, plain * factor)
    assert not torch.allclose(scaled, plain)


def test_masks_are_redrawn_until_non_empty_and_off_the_border(monkeypatch):
    """Acceptance 4's rule: empty and border-touching draws are redrawn; whatever is kept is binary
    and off the border (after the last attempt the border ring is cleared)."""
    gen = _gen("method.mask_attempts=3")
    good = -torch.ones(1, 3, 64, 64)
    good[..., 20:30, 20:30] = 1  # a square off the border
    draws = iter([
        torch.full((3, 3, 64, 64), -1.0),  # attempt 0: all empty
        torch.cat([good, torch.ones(1, 3, 64, 64), -torch.ones(1, 3, 64, 64)]),  # 1: kept, border, empty
        torch.ones(2, 3, 64, 64),  # attempt 2 (last): the two left, both touch the border
    ])

    def fake_draw(states, seed, options, guidance):
        img = next(draws)
        assert img.shape[0] == states.shape[0]
        return img

    monkeypatch.setattr(gen, "_draw", fake_draw)
    masks = gen.sample_masks([0, 1, 2], seed=0, options=OPTIONS)
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    ring = 2  # 64 px // 32
    assert all(not border_touching(m, ring) for m in masks)
    assert np.array_equal(masks[0], (good[0, 0] > 0).numpy().astype(np.uint8))
    assert (masks[1:].sum(axis=(1, 2)) == (64 - 2 * ring) ** 2).all()  # the last draw, its ring cleared
    # an untrained model's real draws obey the same
    real = _gen().sample_masks([0, 1], seed=0, options=OPTIONS)
    assert set(np.unique(real)) <= {0, 1} and all(not border_touching(m, ring) for m in real)


def test_unknown_type_and_missing_normal_images_are_named():
    gen = _gen()
    normal = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(KeyError, match="fabric/stain"):
        gen.sample(1, Conditions(["fabric"], ["stain"], normal_image=normal), seed=0, options=OPTIONS)
    with pytest.raises(ValueError, match="normal_image"):
        gen.sample(1, Conditions(["fabric"], ["hole"]), seed=0, options=OPTIONS)


def test_checkpoint_round_trip(tmp_path):
    from defectforge.methods.base import load_generator

    gen = _gen()
    with torch.no_grad():
        gen.anomaly["embeddings"][1].add_(0.5)
    path = gen.save_pretrained(tmp_path / "ad")
    back = load_generator(path)
    for (name, a), (_, b) in zip(gen.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_on_an_sd_folder_backbone_it_trains_samples_and_blends_within_the_vae_tolerance(sd_folder, tmp_path):
    """Acceptance 7 (and 2 with a VAE): ``method.backbone.path`` = a tiny SD-layout folder written
    here; the method's stages train (the backbone stays frozen and is not a stage), it samples, and
    outside the latent mask the final latent is encode(y) exactly (the pixels are its decoding:
    the VAE mixes cells, see ``blend_sample``); a folder missing a part fails naming it."""
    import shutil

    folder = sd_folder
    ctx = GeneratorContext(("fabric",), {"fabric": ("hole",)}, 32)
    cfg = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=[
        f"method.backbone.path={folder}", "data.resolution=32"])
    gen = build_generator(cfg.method, ctx)
    assert [s.name for s in gen.stages()] == ["anomaly", "mask"] and "backbone" not in gen.saved_modules()
    assert not cfg.method.trains_on_good() and cfg.method.pretraining() is None
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[:, 10:18, 12:20] = 1
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "mask": mask, "product": torch.zeros(2, dtype=torch.long),
             "defect": torch.ones(2, dtype=torch.long)}
    for stage in ("anomaly", "mask"):
        loss = gen.training_step(batch, stage)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
    assert all(p.grad is None for p in gen.backbone.parameters())
    normal_u8 = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = gen.sample(2, Conditions(["fabric"] * 2, ["hole"] * 2, normal_image=normal_u8), seed=0, options=OPTIONS)
    assert out.images.shape == (2, 32, 32, 3) and set(np.unique(out.masks)) <= {0, 1}

    normal = torch.from_numpy(normal_u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    _, latent = gen.blend_sample(normal, mask.to(torch.uint8), ["fabric"] * 2, [0, 0], seed=0, options=OPTIONS,
                                 return_latent=True)
    with torch.no_grad():
        y0 = gen.backbone.encode(normal)
    outside = (torch.nn.functional.max_pool2d(mask.float().unsqueeze(1), 4) == 0).expand_as(latent)
    assert torch.equal(latent[outside], y0[outside]) and not torch.allclose(latent[~outside], y0[~outside])

    broken = tmp_path / "no-unet"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "unet")
    bad = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=[f"method.backbone.path={broken}"])
    from defectforge.config import ConfigError

    with pytest.raises(ConfigError, match="lacks unet/"):
        build_generator(bad.method, ctx)
