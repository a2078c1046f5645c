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
from defectforge.methods.base import CheckpointError, Conditions, GeneratorContext, build_generator, load_generator
from defectforge.nn.unets import count_downsamplings

CTX = GeneratorContext(products=("p",), classes={"p": ("hole", "scratch")}, resolution=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Other test processes share the 2 cores; one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    gen.sample(1, Conditions(["p"], ["hole"]), seed=0, sampler="ddpm")
    assert [t for _, t in calls] == list(range(49, -1, -1))  # one pass T-1 -> 0, no restart
    assert [t for m, t in calls if m == "unet_large"] == list(range(49, 19, -1))
    assert [t for m, t in calls if m == "unet_small"] == list(range(19, -1, -1))


@pytest.mark.parametrize("u, large_last, small_first", [(200, 299, 199), (250, 299, 199), (299, 299, 199)])
def test_ddim_switch_maps_onto_the_step_grid(u, large_last, small_first):
    gen = make(f"method.u={u}")
    calls = record_calls(gen)
    gen.sample(1, Conditions(["p"], ["scratch"]), seed=0, sampler="ddim", steps=10)
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
            unet.conv_out.bias[3 + 2] = -50.0  # negative noise prediction -> large x0 in that channel
    out = gen.sample(4, Conditions(["p", "q", "p", "q"], ["scratch", "crack", "good", "crack"]), seed=1,
                     sampler="ddim", steps=5, batch_size=3)
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
        gen.sample(1, Conditions(["p"], ["dent"]), seed=0, steps=2)
    with pytest.raises(KeyError, match="unknown product"):
        gen.sample(1, Conditions(["zz"], ["hole"]), seed=0, steps=2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seeds_reproduce(sampler):
    gen = make("method.num_train_timesteps=50", "method.u=20")
    cond = Conditions(["p", "p"], ["hole", "good"])
    a = gen.sample(2, cond, seed=3, sampler=sampler, steps=6)
    b = gen.sample(2, cond, seed=3, sampler=sampler, steps=6)
    c = gen.sample(2, cond, seed=4, sampler=sampler, steps=6)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)


# --------------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_and_strict_keys(tmp_path):
    gen = make("method.num_train_timesteps=50", "method.u=20")
    cond = Conditions(["p"], ["scratch"])
    ref = gen.sample(1, cond, seed=5, sampler="ddpm", steps=8)
    ckpt = gen.save_pretrained(tmp_path / "ckpt")
    loaded = load_generator(ckpt)
    out = loaded.sample(1, cond, seed=5, sampler="ddpm", steps=8)
    assert np.array_equal(ref.images, out.images) and np.array_equal(ref.masks, out.masks)
    assert load_generator(ckpt, method_overrides={"u": 30}).config.u == 30

    weights = ckpt / "unet_small.safetensors"
    state = load_file(str(weights))
    dropped = dict(state)
    dropped.pop(next(iter(dropped)))
    save_file(dropped, str(weights))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_generator(ckpt)
    save_file({**state, "extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_generator(ckpt)


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


def test_paper_preset_values():
    m = resolve_config(method="defect-gen", preset="paper").method
    assert (m.num_train_timesteps, m.beta_schedule, m.prediction_type) == (1000, "squaredcos_cap_v2", "epsilon")
    assert m.large_downsamplings == 5 and 256 % 2**m.large_downsamplings == 0
    assert resolve_config(method="defect-gen", preset="tiny", overrides=["method.u=300"]).method.u == 300
