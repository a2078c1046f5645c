"""nn/dit.py: DefectDiffu's segmented DiT. A loaded diffusers DiT computes what diffusers computes;
each group's prompt reaches only its own blocks and those after; only the defect blocks
cross-attend, and the mask head reads exactly their attention probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from defectforge.nn.dit import GROUPS, DiTConfig, SegmentedDiT, reduce_attention

TEXT = 12
HEADS, HEAD_DIM = 2, 8


def _model(seed: int = 0, **overrides: int) -> SegmentedDiT:
    settings = dict(sample_size=8, in_channels=4, patch_size=2, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, background_blocks=1, defect_blocks=2, fusion_blocks=1,
                    text_dim=TEXT, mask_head_channels=8) | overrides
    torch.manual_seed(seed)
    return SegmentedDiT(DiTConfig(**settings)).eval()


def _inputs(seed: int = 1, batch: int = 2, length: int = 5, hw: tuple[int, int] = (8, 8)) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 3:] = False  # the second prompt is 3 tokens + padding
    return dict(latent=torch.randn(batch, 4, *hw, generator=g), timestep=torch.tensor([3, 611])[:batch],
                pooled={group: torch.randn(batch, TEXT, generator=g) for group in GROUPS},
                defect_states=torch.randn(batch, length, TEXT, generator=g), defect_token_mask=mask)


def _randomise(module: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _new_zero_layers(model: SegmentedDiT) -> list[torch.nn.Module]:
    """The new layers built at zero: the prompt projections and the cross-attention output projections."""
    return [*model.prompt_proj.values()] + [b.attn2.to_out[0] for b in model.transformer_blocks if b.attn2 is not None]


def _adaln_zero_layers(model: SegmentedDiT) -> list[torch.nn.Module]:
    """DiT's adaLN-Zero (``initialise_as_dit``): every block's modulation and the final layer."""
    layers = model.adaln_zero_layers()
    assert layers == [b.norm1.linear for b in model.transformer_blocks] + [model.proj_out_1, model.proj_out_2]
    return layers


def _zero_initialised(model: SegmentedDiT) -> list[torch.nn.Module]:
    return _new_zero_layers(model) + _adaln_zero_layers(model)


def test_a_fresh_model_is_initialised_as_dit():
    """adaLN-Zero: every block starts as the identity (its modulation zero, so its gates are) and
    the output at zero; the other linear layers are xavier-uniform with zero biases."""
    model = _model()
    for layer in _zero_initialised(model):
        assert not layer.weight.any() and not layer.bias.any()
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs)
    assert not out.sample.any()
    fc = model.transformer_blocks[0].ff.net[2]
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound and not fc.bias.any()


def test_output_shapes_and_groups():
    model = _model()
    assert model.block_groups == ("background", "defect", "defect", "fusion")
    with torch.no_grad():
        out = model(**_inputs())
        assert out.sample.shape == out.mask_latent.shape == (2, 4, 8, 8)
        assert len(out.attention_maps) == 2
        assert all(m.shape == (2, HEADS, 16, 5) for m in out.attention_maps)
        wide = model(**_inputs(hw=(8, 12)))  # a non-square latent: 4 x 6 patches
    assert wide.sample.shape == wide.mask_latent.shape == (2, 4, 8, 12)
    assert wide.attention_maps[0].shape == (2, HEADS, 24, 5)


def test_only_defect_blocks_cross_attend_and_the_mask_head_reads_exactly_their_maps():
    model = _model()
    for block, group in zip(model.transformer_blocks, model.block_groups):
        assert (block.attn2 is not None) == (group == "defect"), group
        assert (block.norm2 is not None) == (group == "defect"), group
    seen, head_input = [], []
    for block in model.transformer_blocks:
        if block.attn2 is not None:
            block.attn2.register_forward_pre_hook(
                lambda _m, args, kwargs: seen.append((args[0], kwargs["encoder_hidden_states"])), with_kwargs=True)
    model.mask_head.register_forward_pre_hook(lambda _m, args: head_input.append(args[0]))
    inputs = _inputs()
    tokens = torch.tensor([[False, True, True, False, False], [False, True, False, False, False]])
    with torch.no_grad():
        out = model(**inputs, mask_tokens=tokens)

    attended = inputs["defect_token_mask"]
    expected = []
    defect_blocks = [b for b in model.transformer_blocks if b.attn2 is not None]
    assert len(seen) == len(defect_blocks) == 2
    for block, (x, states), recorded in zip(defect_blocks, seen, out.attention_maps):
        attn = block.attn2
        q = attn.to_q(x).reshape(2, 16, HEADS, HEAD_DIM).transpose(1, 2)
        k = attn.to_k(states).reshape(2, 5, HEADS, HEAD_DIM).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / HEAD_DIM ** 0.5
        probs = scores.masked_fill(~attended[:, None, None, :], float("-inf")).softmax(-1)  # Eq. 5, over tokens
        torch.testing.assert_close(recorded, probs, rtol=1e-5, atol=1e-6)
        expected.append((probs * tokens[:, None, None, :]).sum(-1).reshape(2, HEADS, 4, 4))
    (got,) = head_input
    assert got.shape == (2, 2 * HEADS, 4, 4)
    torch.testing.assert_close(got, torch.cat(expected, dim=1), rtol=1e-5, atol=1e-6)
    assert got.std() > 0  # the chosen tokens' share varies over the image


def test_attention_sums_to_one_over_unpadded_tokens_and_padding_changes_nothing():
    model = _model()
    for layer in _zero_initialised(model):
        _randomise(layer)  # so the cross-attention reaches the sample
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs)
        for maps in out.attention_maps:
            torch.testing.assert_close(maps.sum(-1), torch.ones(2, HEADS, 16), rtol=0, atol=1e-6)
            assert torch.all(maps[1, ..., 3:] == 0)  # the second row's padding
        padded = dict(inputs, defect_states=inputs["defect_states"].clone())
        padded["defect_states"][1, 3:] += 5.0
        same = model(**padded)
        real = dict(inputs, defect_states=inputs["defect_states"].clone())
        real["defect_states"][1, 1] += 5.0
        other = model(**real)
    torch.testing.assert_close(same.sample, out.sample, rtol=0, atol=1e-6)
    torch.testing.assert_close(same.mask_latent, out.mask_latent, rtol=0, atol=1e-6)
    assert not torch.allclose(other.sample[1], out.sample[1], atol=1e-4)


def test_a_fresh_model_ignores_prompts_and_defect_states_in_its_sample():
    model = _model()
    for layer in _adaln_zero_layers(model):
        _randomise(layer)  # a sample that is not zero; the new layers stay at zero
    a, b = _inputs(seed=1), _inputs(seed=2)
    b["latent"], b["timestep"] = a["latent"], a["timestep"]
    with torch.no_grad():
        out_a, out_b = model(**a), model(**b)
    assert torch.equal(out_a.sample, out_b.sample)
    assert not torch.allclose(out_a.mask_latent, out_b.mask_latent)  # the maps do depend on c_d


@pytest.mark.parametrize("group", GROUPS)
def test_a_group_prompt_reaches_its_blocks_and_not_the_blocks_before(group):
    model = _model()
    for layer in _adaln_zero_layers(model):
        _randomise(layer)  # trained-like modulation: a block's prompt changes its output
    outputs: list[torch.Tensor] = []
    for block in model.transformer_blocks:
        block.register_forward_hook(lambda _m, _args, output: outputs.append(output))
    inputs = _inputs()
    with torch.no_grad():
        before = model(**inputs).sample
        first = list(outputs)
        outputs.clear()
        _randomise(model.prompt_proj[group])
        after = model(**inputs).sample
    start = model.block_groups.index(group)
    for i, (old, new) in enumerate(zip(first, outputs)):
        if i < start:
            assert torch.equal(old, new), f"block {i} ({model.block_groups[i]}) saw the {group} prompt"
        elif model.block_groups[i] == group:
            assert not torch.allclose(old, new, atol=1e-4), f"block {i} ignored its {group} prompt"
    assert not torch.allclose(before, after, atol=1e-4)


def test_gradients_reach_every_parameter():
    model = _model().train()
    inputs = _inputs()

    target = torch.randn_like(inputs["latent"])

    def backward() -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        ((out.sample - target).square().mean() + out.mask_latent.square().mean()).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    # Fresh: the final layer learns first (adaLN-Zero's zero output layer blocks the gradient to the
    # layers before it on the first step, by design, as ControlNet's zero convs do).
    grads = backward()
    for name in ("proj_out_2.weight", "proj_out_2.bias"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # Once the adaLN-Zero layers are not zero, the new zero layers themselves learn.
    for layer in _adaln_zero_layers(model):
        _randomise(layer)
    grads = backward()
    zero_params = {id(p) for layer in _new_zero_layers(model) for p in layer.parameters()}
    for name, p in model.named_parameters():
        if id(p) in zero_params:
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # The cross-attention's queries and keys learn from the mask loss alone while its output
    # projection is zero: the recorded maps keep their graph into the mask head.
    for i, group in enumerate(model.block_groups):
        if group == "defect":
            for part in ("to_q", "to_k"):
                grad = grads[f"transformer_blocks.{i}.attn2.{part}.weight"]
                assert grad is not None and grad.abs().sum() > 0, (i, part)
    # Once they are not zero, every parameter gets a gradient.
    for layer in _zero_initialised(model):
        _randomise(layer)
    grads = backward()
    dead = [name for name, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not dead, dead


def test_mask_tokens_covering_every_attended_token_are_refused():
    model = _model()
    inputs = _inputs()
    with torch.no_grad():
        maps = model(**inputs).attention_maps
        # Why: every attended token together holds probability 1 at every position.
        summed = reduce_attention(maps, inputs["defect_token_mask"], (4, 4))
        torch.testing.assert_close(summed, torch.ones_like(summed), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="every attended token"):
            model(**inputs, mask_tokens=inputs["defect_token_mask"])
        with pytest.raises(ValueError, match="padding"):
            model(**inputs, mask_tokens=torch.tensor([False, False, False, False, True]))


# ------------------------------------------------------------------------- from diffusers
def _tiny_dit(out_channels: int | None = 8) -> DiTTransformer2DModel:
    torch.manual_seed(3)
    dit = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                out_channels=out_channels, num_layers=3, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for block in dit.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight.zero_()
    return dit


def _saved(dit: DiTTransformer2DModel, folder: Path) -> Path:
    dit.save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    return folder


def _groups(**overrides: int) -> dict[str, int]:
    return dict(background_blocks=1, defect_blocks=1, fusion_blocks=1, text_dim=TEXT) | overrides


@pytest.mark.parametrize("out_channels", [None, 8])  # 8 = 2C: a DiT that also learns its variance
def test_a_loaded_dit_computes_what_diffusers_computes(tmp_path, out_channels):
    dit = _tiny_dit(out_channels)
    from_folder = SegmentedDiT.from_diffusers(_saved(dit, tmp_path / "dit"), **_groups()).eval()
    from_model = SegmentedDiT.from_diffusers(dit, **_groups()).eval()
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(3, 4, 8, 8, generator=g)
    timestep = torch.tensor([0, 37, 999])
    inputs = dict(latent=latent, timestep=timestep,
                  pooled={group: torch.randn(3, TEXT, generator=g) for group in GROUPS},
                  defect_states=torch.randn(3, 6, TEXT, generator=g))
    with torch.no_grad():
        want = dit(latent, timestep, class_labels=torch.tensor([0, 4, 9])).sample[:, :4]
        other_labels = dit(latent, timestep, class_labels=torch.tensor([9, 1, 2])).sample[:, :4]
        for model in (from_folder, from_model):
            got = model(**inputs).sample
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(other_labels, want, rtol=0, atol=0)  # the zeroed tables: any label


def test_group_sizes_must_add_up_to_the_dit_layers(tmp_path):
    with pytest.raises(ValueError, match=r"= 4, but the DiT has num_layers = 3"):
        SegmentedDiT.from_diffusers(_saved(_tiny_dit(), tmp_path / "dit"), **_groups(fusion_blocks=2))


@pytest.mark.parametrize("change, named", [
    ("extra", "transformer_blocks.0.attn1.to_q.lora.weight"),
    ("extra", "transformer_blocks.1.attn2.to_q.weight"),  # a cross-attention of theirs is not ours to load
    ("missing", "transformer_blocks.2.norm1.linear.weight"),
])
def test_a_key_that_cannot_be_placed_is_an_error_naming_it(tmp_path, change, named):
    folder = _saved(_tiny_dit(), tmp_path / "dit")
    (weights,) = folder.glob("*.safetensors")
    state = load_file(str(weights))
    if change == "extra":
        state[named] = torch.zeros(HEADS * HEAD_DIM, HEADS * HEAD_DIM)
    else:
        del state[named]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        SegmentedDiT.from_diffusers(folder, **_groups())


def test_local_mixing_starts_as_dit_and_convolves_the_patch_grid():
    """``local_mixing``: a model with it computes exactly what the same weights compute without it
    until its convolutions move; each one convolves the tokens laid out row-major on the patch grid
    (checked with a kernel that copies the left neighbour, on blocks that are still the identity);
    and it learns."""
    plain, mixed = _model(), _model(local_mixing=True)
    missing = mixed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("local_mix.") for k in missing)
    assert all(not c.weight.any() and not c.bias.any() for c in mixed.local_mix)
    for layer in _adaln_zero_layers(plain):  # blocks and output that compute something
        _randomise(layer)
    mixed.load_state_dict(plain.state_dict(), strict=False)
    inputs = _inputs()
    with torch.no_grad():
        a, b = plain(**inputs), mixed(**inputs)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.mask_latent, b.mask_latent)

    fresh = _model(local_mixing=True)  # blocks are the identity (adaLN-Zero), so tokens = patch embedding
    with torch.no_grad():
        fresh.local_mix[0].weight[:, 0, 1, 0] = 1.0  # out[r, c] = in[r, c - 1]
    seen = {}
    fresh.norm_out.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        fresh(**inputs)
        tokens = fresh.pos_embed(inputs["latent"])  # B x (4*4) x D, row-major over the 4 x 4 grid
    grid = tokens.reshape(2, 4, 4, -1)
    shifted = torch.zeros_like(grid)
    shifted[:, :, 1:] = grid[:, :, :-1]
    torch.testing.assert_close(seen["x"], (grid + shifted).reshape(2, 16, -1))

    mixed.train().zero_grad()
    mixed(**inputs).sample.square().mean().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in mixed.local_mix)
