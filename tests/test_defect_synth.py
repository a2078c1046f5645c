"""DefectSynth (``methods/defect_synth.py``, HMI in ``methods/_hmi.py``): HMI, SAE, SFF, ControlNet, CFG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from defectforge.config import resolve_config
from defectforge.methods._hmi import IMAGE, LATENT, choose_space, interpolate_image, interpolate_latent
from defectforge.methods.base import Conditions, GeneratorContext, SamplingOptions, build_generator
from defectforge.methods.defect_synth import DefectSynth, align, sae_weights, sff, transform
from defectforge.nn.backbone import BACKBONE_PRESETS, MASK_CAPTION, Backbone, BackboneConfig

CTX = GeneratorContext(("fabric", "tile"), {"fabric": ("hole", "scratch"), "tile": ("crack",)}, 64)
OPTIONS = SamplingOptions(sampler="ddim", steps=3)
YY, XX = np.mgrid[:64, :64]


def ellipse(cy: float, cx: float, ry: float, rx: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max((a | b).sum(), 1))


def components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask > 0, np.ones((3, 3)))[1])


def _gen(*overrides: str) -> DefectSynth:
    torch.manual_seed(0)
    cfg = resolve_config(method="defect-synth", preset="tiny", overrides=list(overrides))
    return build_generator(cfg.method, CTX)


def _rows() -> list[dict]:
    """Training rows: fabric/hole small (area 0.0234 each), fabric/scratch thin, tile/crack large."""
    rng = np.random.default_rng(0)
    rows = []
    for product, defect, mask in [
            ("fabric", "hole", ellipse(20, 20, 5, 5)), ("fabric", "hole", ellipse(40, 36, 4, 7)),
            ("fabric", "scratch", ((YY >= 8) & (YY < 50) & (XX >= 30) & (XX < 32)).astype(np.uint8)),
            ("fabric", "scratch", ((YY >= 30) & (YY < 32) & (XX >= 6) & (XX < 58)).astype(np.uint8)),
            ("tile", "crack", ellipse(32, 32, 12, 16)), ("tile", "crack", ellipse(28, 36, 14, 10)),
            ("fabric", "good", np.zeros((64, 64), np.uint8))]:
        own = CTX.class_id(product, defect) if defect != "good" else 0
        rows.append({"product": product, "defect": defect, "image": rng.integers(0, 256, (64, 64, 3), np.uint8),
                     "mask": mask * own})
    return rows


def _batch() -> dict[str, torch.Tensor]:
    mask = torch.zeros(3, 64, 64, dtype=torch.long)
    mask[:, 21:29, 18:37] = 1
    return {"image": torch.rand(3, 3, 64, 64) * 2 - 1, "mask": mask, "product": torch.tensor([0, 0, 1]),
            "defect": torch.tensor([1, 2, 1])}


# ------------------------------------------------------------------------------------------ HMI
SHAPES = {"disc": ellipse(20, 20, 6, 6), "ellipse": ellipse(40, 44, 4, 12),
          "line": np.isin(np.arange(64 * 64).reshape(64, 64), []).astype(np.uint8)}
for _i in range(40):
    SHAPES["line"][10 + _i, 12 + _i // 2: 14 + _i // 2] = 1


@pytest.mark.parametrize("pair", [("disc", "ellipse"), ("line", "ellipse"), ("line", "disc")])
def test_image_hmi_ends_are_the_masks_and_intermediates_stay_connected(pair):
    """Acceptance 1: alpha 0 / 1 give the source / target (IoU >= 0.9; here exactly), every
    intermediate of two connected masks is one 8-connected component, its area in between-ish."""
    src, tgt = SHAPES[pair[0]], SHAPES[pair[1]]
    assert components(src) == components(tgt) == 1
    assert iou(interpolate_image(src, tgt, 0.0), src) >= 0.9 and iou(interpolate_image(src, tgt, 1.0), tgt) >= 0.9
    assert np.array_equal(interpolate_image(src, tgt, 0.0), src)
    for alpha in (0.1, 0.3, 0.5, 0.7, 0.9):
        mid = interpolate_image(src, tgt, alpha)
        assert components(mid) == 1, alpha
        assert 0.5 * min(src.sum(), tgt.sum()) <= mid.sum() <= 2 * max(src.sum(), tgt.sum())
    # the centre of mass moves from the source's towards the target's
    c = [np.array(ndimage.center_of_mass(interpolate_image(src, tgt, a))) for a in (0.0, 0.5, 1.0)]
    assert np.linalg.norm(c[1] - (c[0] + c[2]) / 2) < 0.25 * np.linalg.norm(c[2] - c[0]) + 1


def test_image_hmi_does_not_join_separate_components_at_the_ends():
    two = SHAPES["disc"].copy()
    two[50:54, 50:54] = 1
    assert components(interpolate_image(two, SHAPES["ellipse"], 0.0)) == 2
    with pytest.raises(ValueError, match="non-empty"):
        interpolate_image(np.zeros((64, 64), np.uint8), two, 0.5)


def test_tau_picks_the_space_a_hand_computation_predicts(monkeypatch):
    """Acceptance 1: per type, the mean area ratio of its real masks against tau, computed by hand
    from the rows: the fabric/hole ellipses are below the paper's 0.053 (image space), the
    tile/crack ones above (latent); a tau between the holes' and the scratches' ratio moves the
    scratches to latent space and leaves the holes in image space."""
    gen = _gen()
    gen.prepare_from_data(_rows())
    hole = (_rows()[0]["mask"] > 0).sum() + (_rows()[1]["mask"] > 0).sum()
    crack = (_rows()[4]["mask"] > 0).sum() + (_rows()[5]["mask"] > 0).sum()
    assert gen.area_ratio("fabric", "hole") == pytest.approx(hole / 2 / 4096)
    assert gen.area_ratio("tile", "crack") == pytest.approx(crack / 2 / 4096)
    assert hole / 2 / 4096 < 0.053 <= crack / 2 / 4096
    assert choose_space(0.0529, 0.053) == IMAGE and choose_space(0.053, 0.053) == LATENT
    seen = []

    def fake_latent(backbone, source, target, alpha, steps, caption):
        seen.append(len(source))
        return source  # non-empty: no fallback
    monkeypatch.setattr("defectforge.methods.defect_synth.interpolate_latent", fake_latent)
    cond = Conditions(["fabric", "tile", "fabric"], ["hole", "crack", "scratch"])
    _, _, info = gen.hmi_masks(cond, seed=0, options=OPTIONS)
    assert info["hmi_space"] == [IMAGE, LATENT, IMAGE] and seen == [1] and info["hmi_fallbacks"] == 0
    scratch = gen.area_ratio("fabric", "scratch")
    between = (gen.area_ratio("fabric", "hole") + scratch) / 2  # a tau between the holes' and the scratches'
    assert gen.area_ratio("fabric", "hole") < between < scratch
    low = SamplingOptions(sampler="ddim", steps=3, method={"tau": between})
    _, _, info = gen.hmi_masks(cond, seed=0, options=low)
    assert info["hmi_space"] == [IMAGE, LATENT, LATENT]


@pytest.fixture(scope="module")
def mask_backbone():
    """A tiny backbone trained briefly (120 steps, ~20 s on one core) to draw ellipse masks under
    the mask caption: DDIM inversion needs a denoiser that knows masks (a random one decodes
    nothing, measured; after these steps alpha 0 / 1 came back with IoU 0.94 / 0.94)."""
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(**{**BACKBONE_PRESETS["tiny"], "mask_fraction": 1.0, "cond_dropout": 0.0}),
                  ("fabric",), 32)
    opt = torch.optim.AdamW(bb.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(120):
        masks = np.stack([ellipse(*rng.uniform(10, 22, 2), *rng.uniform(3, 8, 2), size=32) for _ in range(8)])
        batch = {"image": torch.zeros(8, 3, 32, 32), "mask": torch.from_numpy(masks).long(),
                 "product": torch.zeros(8, dtype=torch.long), "defect": torch.ones(8, dtype=torch.long)}
        loss = bb.pretraining_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return bb.eval()


@pytest.mark.slow
def test_latent_hmi_returns_the_source_at_alpha_0(mask_backbone):
    """Acceptance 1: DDIM inversion + slerp + DDIM at alpha = 0 gives the source back (IoU >= 0.8),
    at 1 the target; in between a non-empty mask."""
    src, tgt = ellipse(14, 15, 5, 7, 32), ellipse(20, 18, 4, 4, 32)
    out = interpolate_latent(mask_backbone, np.stack([src] * 3), np.stack([tgt] * 3), np.array([0.0, 1.0, 0.5]),
                             10, MASK_CAPTION)
    assert iou(out[0], src) >= 0.8 and iou(out[1], tgt) >= 0.8
    assert out[2].sum() > 0 and set(np.unique(out)) <= {0, 1}


# ------------------------------------------------------------------------------------------ SAE
def test_alignment_recovers_a_known_rotation_and_shift():
    """Acceptance 2: an L-shaped mask rotated by 90 degrees and shifted by (5, -3) is found again
    (the transform applied to the mask gives the target exactly)."""
    real = np.zeros((64, 64), np.uint8)
    real[20:40, 24:28] = 1
    real[36:40, 24:38] = 1  # an L: no rotational symmetry
    target = transform(real, 90.0, 5, -3, order=0)
    angle, dy, dx, overlap = align(real, target, angles=24)
    assert (angle, dy, dx) == (90.0, 5, -3) and overlap == real.sum() == target.sum()
    assert np.array_equal(transform(real, angle, dy, dx, order=0), target)
    # an image moves with its mask
    image = np.zeros((64, 64, 3), np.uint8)
    image[real > 0] = 200
    assert np.array_equal(transform(image, angle, dy, dx, order=1)[..., 0] > 100, target > 0)


def test_sae_weight_matches_eq7_on_a_hand_case():
    """Acceptance 2: w = ||M||_1 softmax(mean_c((M (z_r - z_t))^2)) + 1 over the 16 positions."""
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 1] = mask[0, 1, 2] = 1
    z_ref, z_t = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    z_ref[0, :, 1, 1] = torch.tensor([1.0, 3.0])  # mean_c of squares: (1 + 9) / 2 = 5
    z_ref[0, :, 1, 2] = torch.tensor([2.0, 0.0])  # (4 + 0) / 2 = 2
    z_ref[0, :, 3, 3] = 7.0  # outside the mask: contributes 0
    w = sae_weights(mask, z_ref, z_t, "paper")
    z = 14 * np.exp(0) + np.exp(5) + np.exp(2)
    assert float(w[0, 1, 1]) == pytest.approx(2 * np.exp(5) / z + 1)
    assert float(w[0, 1, 2]) == pytest.approx(2 * np.exp(2) / z + 1)
    assert float(w[0, 3, 3]) == pytest.approx(2 / z + 1)
    assert float(w.sum()) == pytest.approx(2 + 16)
    clamped = sae_weights(mask, z_ref, z_t, "clamped")
    assert float(clamped.max()) == 1.5 and float(clamped.min()) >= 1.0


def test_sae_scales_the_recorded_attention_of_the_defect_tokens():
    """The first cross-attention layer's probabilities with the weight equal those without, times
    the weight (resized to the layer) on the defect-name tokens only."""
    from defectforge.nn.attention import AttentionControl, install

    gen = _gen()
    bb = gen.backbone
    tokens = gen.defect_tokens(["fabric", "tile"], ["hole", "crack"])
    ids = bb.tokenize([gen.prompt("fabric", "hole")])[0]
    assert bytes((ids[tokens[0]] - 3).tolist()).decode() == " hole defect"  # ByT5: byte + 3
    states = bb.encode_text([gen.prompt("fabric", "hole"), gen.prompt("tile", "crack")])
    weight = 1 + torch.rand(2, 32, 32)
    z, t = torch.randn(2, 12, 32, 32), torch.tensor([500, 500])
    runs = []
    for w in (None, weight):
        control = AttentionControl(weight=w, tokens=tokens, record=True)
        before = dict(bb.unet.attn_processors)
        install(bb.unet, control)
        with torch.no_grad():
            bb.denoise(z, t, states)
        bb.unet.set_attn_processor(before)
        runs.append(control.maps[0][1])
    plain, scaled = runs
    h = plain.shape[2]
    grid = torch.nn.functional.interpolate(weight[:, None], size=(h, h), mode="bilinear", align_corners=False)[:, 0]
    factor = torch.where(tokens[:, None, None, None, :], grid[:, None, :, :, None], torch.ones(()))
    torch.testing.assert_close(scaled, plain * factor)


# ------------------------------------------------------------------------------------------ SFF
def test_sff_changes_latents_only_inside_the_mask_and_rate_0_is_identity():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 8, 8)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    groups = ["a", "a", "b"]
    assert torch.equal(sff(z, mask, groups, 0.0, 0.7, g), z)
    out = sff(z, mask, groups, 1.0, 0.7, g)
    outside = (mask == 0).expand_as(z)
    assert torch.equal(out[outside], z[outside])
    assert not torch.equal(out[0], z[0]) and not torch.equal(out[1], z[1])
    assert torch.equal(out[2], z[2])  # alone in its type: nothing to fuse with


def test_sff_fuses_with_the_best_match_by_hand():
    """Two samples, every point drawn: a masked point of sample 0 becomes 0.7 itself + 0.3 the
    feature of sample 1 with the largest normalised dot product inside sample 1's mask."""
    z = torch.zeros(2, 2, 1, 3)
    z[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    z[1, :, 0, 0] = torch.tensor([0.0, 5.0])  # best match of nothing along x
    z[1, :, 0, 1] = torch.tensor([2.0, 0.1])  # the best match of (1, 0)
    z[1, :, 0, 2] = torch.tensor([-3.0, 0.0])
    mask = torch.ones(2, 1, 1, 3)
    mask[0, :, 0, 1:] = 0  # sample 0: only its first point may change
    out = sff(z, mask, [0, 0], 1.0, 0.7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[0, :, 0, 0], 0.7 * torch.tensor([1.0, 0.0]) + 0.3 * torch.tensor([2.0, 0.1]))
    torch.testing.assert_close(out[0, :, 0, 1:], z[0, :, 0, 1:])


# ------------------------------------------------------------------------- ControlNet and guidance
def test_stages_modules_and_only_the_controlnet_learns():
    from defectforge.train.loop import _set_trainable

    gen = _gen()
    assert [(s.name, s.modules, s.rows) for s in gen.stages()] == [
        ("backbone", ("backbone",), "balanced"), ("controlnet", ("controlnet",), "defective")]
    assert set(gen.saved_modules()) == {"backbone", "controlnet", "bank"}
    _set_trainable(gen, ("controlnet",))
    gen.training_step(_batch(), "controlnet")["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.controlnet.parameters())
    assert all(p.grad is None for p in gen.backbone.parameters())


def test_controlnet_starts_from_the_trained_unet():
    """``begin_stage("controlnet")`` copies the backbone UNet as it is then (trained after the
    generator was built), with the ControlNet's zero convolutions at zero."""
    gen = _gen()
    with torch.no_grad():
        for p in gen.backbone.unet.down_blocks.parameters():
            p.add_(1.0)
    assert not torch.equal(gen.controlnet.down_blocks[0].resnets[0].conv1.weight,
                           gen.backbone.unet.down_blocks[0].resnets[0].conv1.weight)
    gen.begin_stage("controlnet")
    for (name, a), (_, b) in zip(gen.controlnet.down_blocks.state_dict().items(),
                                 gen.backbone.unet.down_blocks.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(float(p.detach().abs().sum()) == 0 for p in gen.controlnet.controlnet_down_blocks.parameters())


def test_real_classifier_free_guidance():
    """Acceptance 2: the conditional and unconditional predictions differ (same control), scale 1
    is the conditional prediction, scale s is u + s (c - u) of two recorded calls."""
    gen = _gen()
    bb = gen.backbone
    with torch.no_grad():
        for p in gen.controlnet.controlnet_down_blocks.parameters():  # non-zero residuals
            p.normal_(0, 0.05)
        control = torch.zeros(2, 1, 64, 64)
        control[:, :, 10:30, 20:40] = 1
        extra = gen.residuals(control)
        z, t = torch.randn(2, 12, 32, 32), torch.tensor([700, 300])
        cond = bb.encode_text([gen.prompt("fabric", "hole")] * 2)
        uncond = bb.encode_text([""] * 2)
        c = bb.denoise(z, t, cond, **extra(z, t, cond))
        u = bb.denoise(z, t, uncond, **extra(z, t, uncond))
        assert not torch.allclose(c, u)
        torch.testing.assert_close(bb.guided(z, t, cond, uncond, 1.0, extra), c, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bb.guided(z, t, cond, uncond, 9.0, extra), u + 9 * (c - u), atol=1e-4, rtol=1e-4)
        none = bb.denoise(z, t, cond)
        assert not torch.allclose(c, none)  # the control reaches the UNet


def test_blending_keeps_the_normal_image_outside_the_latent_mask():
    gen = _gen()
    gen.prepare_from_data(_rows())
    rng = np.random.default_rng(0)
    normal_u8 = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    normal = torch.from_numpy(normal_u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[:, 20:30, 25:41] = 1
    out, latent = gen.synthesize(normal, masks, np.array([0, 1]), ["fabric"] * 2, ["hole"] * 2, seed=1,
                                 options=OPTIONS, return_latent=True)
    cells = torch.nn.functional.interpolate(torch.nn.functional.max_pool2d(
        torch.from_numpy(masks).float().unsqueeze(1), 2), scale_factor=2, mode="nearest").bool().expand_as(out)
    assert torch.equal(out[~cells], normal[~cells]) and not torch.allclose(out[cells], normal[cells])


def test_sample_end_to_end_masks_errors_and_checkpoint(tmp_path):
    from defectforge.methods.base import load_generator

    gen = _gen()
    gen.prepare_from_data(_rows())
    normal = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    cond = Conditions(["fabric", "fabric", "tile"], ["hole", "scratch", "crack"], normal_image=normal)
    batch = gen.sample(3, cond, seed=0, options=OPTIONS)
    assert batch.images.shape == (3, 64, 64, 3) and batch.images.dtype == np.uint8
    assert [int(m.max()) for m in batch.masks] == [1, 2, 1] and all(m.any() for m in batch.masks)
    again = gen.sample(3, cond, seed=0, options=OPTIONS)
    assert np.array_equal(batch.images, again.images) and np.array_equal(batch.masks, again.masks)
    with pytest.raises(KeyError, match="fabric/stain"):
        gen.sample(1, Conditions(["fabric"], ["stain"], normal_image=normal[:1]), seed=0, options=OPTIONS)
    with pytest.raises(ValueError, match="normal_image"):
        gen.sample(1, Conditions(["fabric"], ["hole"]), seed=0, options=OPTIONS)
    path = gen.save_pretrained(tmp_path / "ds")
    back = load_generator(path)
    assert len(back.bank) == 6
    for (name, a), (_, b) in zip(gen.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert np.array_equal(back.sample(3, cond, seed=0, options=OPTIONS).images, batch.images)


def test_on_an_sd_folder_backbone_it_trains_and_samples(sd_folder):
    """Acceptance 5: ``method.backbone.path`` = a tiny SD-layout folder (VAE latents at 1/4): the
    ControlNet's mask embedding downsamples to the VAE's latent, the stage trains, it samples."""
    ctx = GeneratorContext(("fabric",), {"fabric": ("hole",)}, 32)
    cfg = resolve_config(method="defect-synth", preset="tiny", overrides=[
        f"method.backbone.path={sd_folder}", "data.resolution=32"])
    gen = build_generator(cfg.method, ctx)
    assert [s.name for s in gen.stages()] == ["controlnet"] and "backbone" not in gen.saved_modules()
    assert not cfg.method.trains_on_good() and cfg.method.pretraining() is None
    rows = [{"product": "fabric", "defect": "hole", "image": np.full((32, 32, 3), 90 + 40 * i, np.uint8),
             "mask": ellipse(12 + 4 * i, 14, 4, 5, 32)} for i in range(2)]
    gen.prepare_from_data(rows)
    gen.begin_stage("controlnet")
    mask = torch.from_numpy(np.stack([r["mask"] for r in rows])).long()
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "mask": mask, "product": torch.zeros(2, dtype=torch.long),
             "defect": torch.ones(2, dtype=torch.long)}
    loss = gen.training_step(batch, "controlnet")["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in gen.backbone.parameters())
    normal = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = gen.sample(2, Conditions(["fabric"] * 2, ["hole"] * 2, normal_image=normal), seed=0, options=OPTIONS)
    assert out.images.shape == (2, 32, 32, 3) and set(np.unique(out.masks)) <= {0, 1} and out.masks.any()
