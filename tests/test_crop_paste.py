"""Crop-Paste baseline: seeded, pastes inside its mask only, strict checkpoints, no stages."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from defectforge.config import resolve_config
from defectforge.methods.base import CheckpointError, Conditions, GeneratorContext, build_generator, load_generator


@pytest.fixture(scope="module")
def data(synth_root):
    from defectforge.data.mvtec import load_rows, scan_dataset

    index = scan_dataset(synth_root)
    product = index.products[0]
    by_defect: dict = {}
    for r in index.defect_refs(product):
        by_defect.setdefault(r.defect, []).append(r)
    defect_refs = [r for refs in by_defect.values() for r in refs[:3]]
    good_refs = index.good_refs("train")[:6]
    rows, _ = load_rows(index, defect_refs, 64)
    good, _ = load_rows(index, [r for r in good_refs if r.product == product], 64)
    ctx = GeneratorContext((product,), {product: index.classes[product]}, 64)
    return ctx, rows, np.stack([g["image"] for g in good])


def _gen(ctx, rows, *overrides):
    cfg = resolve_config(method="crop-paste", preset="tiny", overrides=list(overrides))
    gen = build_generator(cfg.method, ctx)
    gen.prepare_from_data(rows)
    return gen


def _conditions(ctx, normal, n=6):
    p = ctx.products[0]
    defects = [ctx.classes[p][i % len(ctx.classes[p])] for i in range(n)]
    return Conditions([p] * n, defects, normal_image=normal[np.arange(n) % len(normal)])


def test_no_stages_and_needs_normal_images(data):
    ctx, rows, normal = data
    gen = _gen(ctx, rows)
    assert gen.stages() == [] and gen.requires_normal_images
    assert len(gen.bank) == len(rows)
    with pytest.raises(ValueError, match="normal_image"):
        gen.sample(2, Conditions([ctx.products[0]] * 2, [ctx.classes[ctx.products[0]][0]] * 2), seed=0)


def test_seeded_and_pasted_only_inside_the_mask(data):
    ctx, rows, normal = data
    gen = _gen(ctx, rows)
    cond = _conditions(ctx, normal)
    a, b = gen.sample(6, cond, seed=3), gen.sample(6, cond, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    c = gen.sample(6, cond, seed=4)
    assert not np.array_equal(a.masks, c.masks)
    p = ctx.products[0]
    for i in range(6):
        mask = a.masks[i]
        assert mask.any(), "pasted mask is empty"
        assert set(np.unique(mask)) <= {0, ctx.class_id(p, cond.defect[i])}
        changed = np.any(a.images[i] != cond.normal_image[i], axis=-1)
        assert changed.any()
        allowed = ndimage.binary_dilation(mask > 0, iterations=1)
        assert not (changed & ~allowed).any(), "pixels changed outside the pasted mask"


def test_checkpoint_round_trip_and_strict_keys(data, tmp_path):
    from safetensors.torch import load_file, save_file

    ctx, rows, normal = data
    gen = _gen(ctx, rows, "method.max_rotation=30")
    path = gen.save_pretrained(tmp_path / "ckpt")
    loaded = load_generator(path)
    assert loaded.config.max_rotation == 30
    cond = _conditions(ctx, normal)
    np.testing.assert_array_equal(gen.sample(6, cond, seed=1).images, loaded.sample(6, cond, seed=1).images)

    state = load_file(str(path / "bank.safetensors"))
    extra = dict(state, bogus=state["sizes"].clone())
    save_file(extra, str(path / "bank.safetensors"))
    # A file changed after saving is refused by its hash first ...
    with pytest.raises(CheckpointError, match="bank.safetensors: sha256"):
        load_generator(path)
    # ... and one whose recorded hash was updated too still has to fit the module exactly.
    _rehash(path)
    with pytest.raises(CheckpointError, match="unexpected keys \\['bogus'\\]"):
        load_generator(path)
    missing = {k: v for k, v in state.items() if k != "masks"}
    save_file(missing, str(path / "bank.safetensors"))
    _rehash(path)
    with pytest.raises(CheckpointError, match="missing keys \\['masks'\\]"):
        load_generator(path)


def _rehash(path):
    import json

    from defectforge.methods.base import file_sha256

    meta = json.loads((path / "config.json").read_text())
    meta["sha256"] = {f: file_sha256(path / f) for f in meta["sha256"]}
    (path / "config.json").write_text(json.dumps(meta))


def test_unknown_defect_is_a_clear_error(data):
    ctx, rows, normal = data
    gen = _gen(ctx, rows)
    with pytest.raises(KeyError, match="unknown product/defect"):
        gen.sample(1, Conditions([ctx.products[0]], ["nonsense"], normal_image=normal[:1]), seed=0)
