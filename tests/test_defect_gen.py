"""Defect-Gen: the paper's mechanism, checked on the tiny preset on CPU.

What is asserted (and could fail): the diffusion loss falls when fitting a fixed batch; sampling
runs the large model for exactly the timesteps >= u and the small one for the rest of the *same*
trajectory (DDPM and DDIM); masks only hold the product's class ids; seeds reproduce; checkpoints
round-trip and reject missing/extra keys; the small model's receptive field is what the config says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file, save_file

from defectforge.config import ConfigError, resolve_config
from defectforge.methods.base import (
    CheckpointError,
    Conditions,
    GeneratorContext,
    SamplingOptions,
    build_generator,
    load_generator,
)
from defectforge.nn.unets import count_downsamplings

CTX = GeneratorContext(products=("p",), classes={"p": ("hole", "scratch")}, resolution=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why


def make(*overrides: str, context: GeneratorContext = CTX, seed: int = 0):
    torch.manual_seed(seed)
    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=list(overrides))
    return build_generator(cfg.method, context)


def fixed_batch(b: int = 2, res: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = torch.zeros(b, res, res, dtype=torch.long)
    mask[:, 20:40, 10:30] = 1
    mask[1:, 40:50, 30:60] = 2
    return {"image": torch.rand(b, 3, res, res, generator=g) * 2 - 1, "mask": mask,
            "product": torch.zeros(b, dtype=torch.long), "defect": torch.tensor([1, 2][:b] + [0] * (b - 2))}


def record_calls(gen) -> list[tuple[str, int]]:
    """Forward pre-hooks on both UNets: the ordered list of (model, t) the sampler called."""
    calls: list[tuple[str, int]] = []
    for name in ("unet_large", "unet_small"):
        def hook(module, args, kwargs, name=name):
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            calls.append((name, int(t)))
        getattr(gen, name).register_forward_pre_hook(hook, with_kwargs=True)
    return calls


# ------------------------------------------------------------------------------------ training
def test_loss_falls_on_fixed_batch():
    gen = make()
    batch = fixed_batch()
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)

    def loss_at_fixed_noise() -> dict[str, torch.Tensor]:
        torch.manual_seed(123)  # same timesteps and noise every step
        return gen.training_step(batch, "diffusion")

    with torch.no_grad():
        first = loss_at_fixed_noise()
    assert set(first) == {"loss", "loss_large", "loss_small"}
    assert torch.allclose(first["loss"], first["loss_large"] + first["loss_small"])
    for _ in range(60):
        losses = loss_at_fixed_noise()
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    with torch.no_grad():
        last = loss_at_fixed_noise()
    for key in ("loss_large", "loss_small"):
        assert last[key] < 0.7 * first[key], (key, float(first[key]), float(last[key]))


def test_training_step_rejects_bad_batch():
    gen = make()
    batch = fixed_batch()
    batch["mask"][0, 0, 0] = 3  # K = 2
    with pytest.raises(ValueError, match="class ids"):
        gen.training_step(batch, "diffusion")
    with pytest.raises(ValueError, match="stage"):
        gen.training_step(fixed_batch(), "nope")


# ------------------------------------------------------------------------------------ sampling
def test_ddpm_switches_models_at_u_on_one_trajectory():
    gen = make("method.num_train_timesteps=50", "method.u=20")
    calls = record_calls(gen)
    gen.sample(1, Conditions(["p"], ["hole"]), seed=0, options=SamplingOptions(sampler="ddpm"))
    assert [t for _, t in calls] == list(range(49, -1, -1))  # one pass T-1 -> 0, no restart
    assert [t for m, t in calls if m == "unet_large"] == list(range(49, 19, -1))
    assert [t for m, t in calls if m == "unet_small"] == list(range(19, -1, -1))


@pytest.mark.parametrize("u, large_last, small_first", [(200, 299, 199), (250, 299, 199), (299, 299, 199)])
def test_ddim_switch_maps_onto_the_step_grid(u, large_last, small_first):
    gen = make(f"method.u={u}")
    calls = record_calls(gen)
    gen.sample(1, Conditions(["p"], ["scratch"]), seed=0, options=SamplingOptions(sampler="ddim", steps=10))
    grid = list(range(999, 0, -100))  # trailing spacing: 999, 899, ..., 99
    assert [t for _, t in calls] == grid
    large = [t for m, t in calls if m == "unet_large"]
    small = [t for m, t in calls if m == "unet_small"]
    assert large == [t for t in grid if t >= u] and large[-1] == large_last
    # Continuous trajectory: the small model starts at the next grid point below u, not at T-1.
    assert small[0] == small_first and small == [t for t in grid if t < u]


def test_masks_hold_only_the_products_class_ids():
    ctx = GeneratorContext(products=("p", "q"), classes={"p": ("hole", "scratch"), "q": ("crack",)},
                           resolution=64)
    gen = make("method.num_train_timesteps=50", "method.u=25", context=ctx)
    # Push the last mask channel (class 2) up everywhere: without the per-product restriction
    # product q (one defect type) would get class id 2, which it does not have.
    with torch.no_grad():
        for unet in (gen.unet_large, gen.unet_small):
            unet.conv_out.bias[3 + 2] = 50.0  # x0 prediction (the default): a large x0 in that channel
    out = gen.sample(4, Conditions(["p", "q", "p", "q"], ["scratch", "crack", "good", "crack"]), seed=1,
                     options=SamplingOptions(sampler="ddim", steps=5, batch_size=3))
    assert out.images.dtype == np.uint8 and out.images.shape == (4, 64, 64, 3)
    assert out.masks.dtype == np.uint8 and out.masks.shape == (4, 64, 64)
    assert out.product == ["p", "q", "p", "q"] and out.defect == ["scratch", "crack", "good", "crack"]
    assert out.masks[[1, 3]].max() <= 1
    assert (out.masks[[0, 2]] == 2).any()  # p does have class 2


def test_decode_restricts_the_argmax_to_valid_ids():
    ctx = GeneratorContext(products=("p", "q"), classes={"p": ("hole", "scratch"), "q": ("crack",)},
                           resolution=64)
    gen = make(context=ctx)
    x = -torch.ones(2, 6, 64, 64)
    x[:, 5] = 1.0  # class 2 strongest
    x[:, 4, :32] = 0.5  # class 1 second in the top half
    images, masks = gen.decode(x, ["p", "q"])
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and images.max() == 0
    assert (masks[0] == 2).all()
    assert (masks[1, :32] == 1).all() and (masks[1, 32:] == 0).all()


def test_unknown_condition_is_a_clear_error():
    gen = make("method.num_train_timesteps=50", "method.u=25")
    with pytest.raises(KeyError, match="dent"):
        gen.sample(1, Conditions(["p"], ["dent"]), seed=0, options=SamplingOptions(steps=2))
    with pytest.raises(KeyError, match="unknown product"):
        gen.sample(1, Conditions(["zz"], ["hole"]), seed=0, options=SamplingOptions(steps=2))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seeds_reproduce(sampler):
    gen = make("method.num_train_timesteps=50", "method.u=20")
    cond = Conditions(["p", "p"], ["hole", "good"])
    a = gen.sample(2, cond, seed=3, options=SamplingOptions(sampler=sampler, steps=6))
    b = gen.sample(2, cond, seed=3, options=SamplingOptions(sampler=sampler, steps=6))
    c = gen.sample(2, cond, seed=4, options=SamplingOptions(sampler=sampler, steps=6))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)


# --------------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_and_strict_keys(tmp_path):
    gen = make("method.num_train_timesteps=50", "method.u=20")
    cond = Conditions(["p"], ["scratch"])
    ref = gen.sample(1, cond, seed=5, options=SamplingOptions(sampler="ddpm", steps=8))
    ckpt = gen.save_pretrained(tmp_path / "ckpt")
    loaded = load_generator(ckpt)
    out = loaded.sample(1, cond, seed=5, options=SamplingOptions(sampler="ddpm", steps=8))
    assert np.array_equal(ref.images, out.images) and np.array_equal(ref.masks, out.masks)
    # Sampling-time fields change per call through SamplingOptions; weight-shaping ones are refused.
    assert loaded.default_sampling.method == {"u": 20}
    assert loaded.sample(1, cond, seed=5, options=SamplingOptions(steps=8, method={"u": 30})).extras["u"] == 30
    with pytest.raises(ConfigError, match="method.receptive_field is not a sampling-time field"):
        loaded.sample(1, cond, seed=5, options=SamplingOptions(steps=8, method={"receptive_field": "large"}))

    weights = ckpt / "unet_small.safetensors"
    state = load_file(str(weights))
    dropped = dict(state)
    dropped.pop(next(iter(dropped)))
    save_file(dropped, str(weights))
    with pytest.raises(CheckpointError, match="unet_small.safetensors: sha256"):  # changed after saving
        load_generator(ckpt)
    _rehash(ckpt)  # even with a matching recorded hash, the keys must fit the module
    with pytest.raises(CheckpointError, match="missing keys"):
        load_generator(ckpt)
    save_file({**state, "extra.weight": torch.zeros(1)}, str(weights))
    _rehash(ckpt)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_generator(ckpt)


def _rehash(ckpt):
    import json

    from defectforge.methods.base import file_sha256

    meta = json.loads((ckpt / "config.json").read_text())
    meta["sha256"] = {f: file_sha256(ckpt / f) for f in meta["sha256"]}
    (ckpt / "config.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("field, expected", [("small", 2), ("medium", 3), ("large", 6)])
def test_receptive_field_sets_the_small_models_downsamplings(field, expected):
    gen = make(f"method.receptive_field={field}")
    small = gen.unet_small
    assert count_downsamplings(small) == expected
    assert len(small.down_blocks) == expected + 1
    assert small.mid_block is None
    assert not any(isinstance(m, Attention) for m in small.modules())


def test_large_model_is_deep_with_attention_and_mid_block():
    gen = make()
    large = gen.unet_large
    assert count_downsamplings(large) == 6
    assert large.mid_block is not None
    assert any(isinstance(m, Attention) for m in large.down_blocks.modules())
    assert count_downsamplings(make("method.large_downsamplings=5").unet_large) == 5
    assert gen.embed_large.product.num_embeddings == 1 and gen.embed_large.defect.num_embeddings == 3


def test_bad_shapes_and_values_name_the_field():
    ctx48 = GeneratorContext(products=("p",), classes={"p": ("hole",)}, resolution=48)
    with pytest.raises(ConfigError, match=r"method\.large_downsamplings.*data\.resolution"):
        make(context=ctx48)
    with pytest.raises(ConfigError, match=r"method\.receptive_field"):
        make("method.large_downsamplings=4", "method.receptive_field=large", context=ctx48)
    with pytest.raises(ConfigError, match=r"method\.u"):
        resolve_config(method="defect-gen", preset="tiny", overrides=["method.u=1000"])
    with pytest.raises(ConfigError, match=r"method\.large_widths"):
        resolve_config(method="defect-gen", preset="tiny", overrides=["method.large_widths=[8,16]"])


def test_paper_preset_is_the_official_parameterization_and_mask_encoding():
    """Pinned to the official code (config/large_recep.yml, diffusion/base_diffusion.py):
    ``parameterization: x0``, cosine schedule, T = 1000; the mask as a one-hot in {0, 1} beside
    the image in [-1, 1]; decoding by softmax + argmax over the mask channels."""
    cfg = resolve_config(method="defect-gen", preset="paper")
    m = cfg.method
    assert (m.num_train_timesteps, m.beta_schedule, m.prediction_type) == (1000, "squaredcos_cap_v2", "sample")
    assert m.mask_encoding == "onehot01" and m.large_unshuffle == 1 and not m.grayscale_as_one_channel
    assert m.large_downsamplings == 5 and 256 % 2**m.large_downsamplings == 0
    gen = build_generator(m, GeneratorContext(products=("p",), classes={"p": ("hole", "scratch")}, resolution=256))
    sched = gen.noise_scheduler.config
    assert sched.prediction_type == "sample" and sched.beta_schedule == "squaredcos_cap_v2"
    # The cosine schedule's last alpha-bar is tiny: why x0 (not epsilon) prediction.
    assert float(gen.noise_scheduler.alphas_cumprod[-1]) < 1e-6
    batch = fixed_batch(2, 256 // 4)
    image = torch.nn.functional.interpolate(batch["image"], size=256)
    mask = torch.nn.functional.interpolate(batch["mask"][:, None].float(), size=256).long()[:, 0]
    x0 = gen.encode(image, mask)
    assert x0.shape == (2, 3 + 3, 256, 256)
    assert torch.equal(x0[:, :3], image)
    onehot = x0[:, 3:]
    assert set(onehot.unique().tolist()) == {0.0, 1.0} and torch.equal(onehot.sum(1), torch.ones(2, 256, 256))
    assert torch.equal(onehot.argmax(1), mask)
    # decode: softmax + argmax over the mask channels (the argmax survives the softmax)
    logits = torch.randn(2, 3, 256, 256)
    _, masks = gen.decode(torch.cat([torch.zeros(2, 3, 256, 256), logits], 1), ["p", "p"])
    assert np.array_equal(masks, logits.softmax(1).argmax(1).numpy().astype(np.uint8))
    assert resolve_config(method="defect-gen", preset="tiny", overrides=["method.u=300"]).method.u == 300


def test_x0_training_target_is_the_clean_sample_and_mask_ce_is_optional():
    """prediction_type=sample regresses x0; mask_ce_weight > 0 is the official separate-channel
    loss: MSE on the image channels plus the weighted cross-entropy of the mask channels."""
    gen = make("method.num_train_timesteps=50", "method.u=25")
    batch = fixed_batch()
    x0 = gen.encode(batch["image"], batch["mask"])
    seen = {}

    def grab(module, args, kwargs, output):
        seen["pred"] = output.sample

    gen.unet_large.register_forward_hook(grab, with_kwargs=True)
    torch.manual_seed(3)
    losses = gen.training_step(batch, "diffusion")
    assert torch.allclose(losses["loss_large"], torch.nn.functional.mse_loss(seen["pred"], x0), atol=1e-6)
    ce_gen = make("method.num_train_timesteps=50", "method.u=25", "method.mask_ce_weight=0.2")
    ce_gen.unet_large.register_forward_hook(grab, with_kwargs=True)
    torch.manual_seed(3)
    out = ce_gen.training_step(batch, "diffusion")
    pred = seen["pred"]
    mse = torch.nn.functional.mse_loss(pred[:, :3], x0[:, :3])
    ce = torch.nn.functional.cross_entropy(pred[:, 3:], batch["mask"])
    assert torch.allclose(out["loss_large"], mse + 0.2 * ce, atol=1e-5)


def test_u_range_limits_each_models_timesteps_and_u():
    gen = make("method.u_range=[100,500]", "method.u=200")
    assert gen.timestep_ranges() == {"large": (100, 1000), "small": (0, 500)}
    seen = {"unet_large": [], "unet_small": []}
    for name in seen:
        getattr(gen, name).register_forward_pre_hook(
            lambda m, a, k, name=name: seen[name].extend(a[1].tolist()), with_kwargs=True)
    for i in range(20):
        torch.manual_seed(i)
        gen.training_step(fixed_batch(), "diffusion")
    assert min(seen["unet_large"]) >= 100 and max(seen["unet_small"]) < 500
    with pytest.raises(ConfigError, match=r"method\.u=600 is outside method\.u_range"):
        resolve_config(method="defect-gen", preset="tiny", overrides=["method.u_range=[100,500]", "method.u=600"])


def test_grayscale_data_is_one_image_channel_and_comes_back_as_three():
    ctx = GeneratorContext(products=("p",), classes={"p": ("hole", "scratch")}, resolution=64, image_channels=1)
    gen = make(context=ctx)
    assert gen.image_channels == 1 and gen.unet_small.config.in_channels == 1 + 3
    batch = fixed_batch()
    batch["image"] = batch["image"][:, :1].expand(-1, 3, -1, -1).contiguous()
    assert torch.isfinite(gen.training_step(batch, "diffusion")["loss"])
    out = gen.sample(2, Conditions(["p", "p"], ["hole", "scratch"]), seed=0, options=SamplingOptions(steps=3))
    assert out.images.shape == (2, 64, 64, 3)
    assert (out.images[..., 0] == out.images[..., 1]).all() and (out.images[..., 0] == out.images[..., 2]).all()
    assert make("method.grayscale_as_one_channel=false", context=ctx).image_channels == 3


def test_pixel_unshuffle_is_exact_and_shapes_the_large_model():
    gen = make("method.large_unshuffle=2", "method.large_downsamplings=5")
    inner = gen.unet_large.unet
    assert inner.config.sample_size == 32 and inner.config.in_channels == (3 + 3) * 4
    x = torch.randn(2, 6, 64, 64)
    z = torch.nn.functional.pixel_unshuffle(x, 2)
    assert torch.equal(torch.nn.functional.pixel_shuffle(z, 2), x)
    out = gen.unet_large(x, torch.tensor([5, 900]), class_labels=gen.embed_large(
        torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]))).sample
    assert out.shape == x.shape
