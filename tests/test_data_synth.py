"""The built-in synthetic dataset: byte-identical for a seed, exact masks, defect types that differ.

Why these matter: the synthetic data is both the test fixture and the laptop default. If it were
not deterministic, a failing test could not be reproduced; if a mask pixel were not exactly a
changed pixel, every mask metric computed on it would be quietly wrong; if defect types looked
alike, a segmenter would have nothing to learn and the downstream metric would mean nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectforge.cli import main
from defectforge.data.synth import GRAYSCALE, PRODUCTS, render_sample, write_synthetic
from defectforge.paths import MARKER


def _tree(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_trees(tmp_path):
    """Acceptance: ``defectforge data synth --out D --seed 0`` twice gives identical trees (at the
    command's defaults, 128 px x 2 products; the second run goes through the CLI)."""
    a = _tree(write_synthetic(tmp_path / "a", seed=0))
    assert main(["data", "synth", "--out", str(tmp_path / "b"), "--seed", "0"]) == 0
    b = _tree(tmp_path / "b")
    # The command marks the folder it created (output policy, defectforge/paths.py); the dataset
    # itself is what must be identical.
    assert MARKER in b
    del b[MARKER]
    assert sorted(a) == sorted(b)
    assert len(a) > 100 and "metadata.csv" in a and "README.txt" in a
    differing = [k for k in a if a[k] != b[k]]
    assert differing == []


def test_different_seed_gives_different_pictures(tmp_path):
    a = _tree(write_synthetic(tmp_path / "a", seed=0, size=32, products=1))
    b = _tree(write_synthetic(tmp_path / "b", seed=1, size=32, products=1))
    assert sorted(a) == sorted(b)  # same layout and ids ...
    pngs = [k for k in a if k.endswith(".png")]
    differing = [k for k in pngs if a[k] != b[k]]
    assert len(differing) > 0.9 * len(pngs)  # ... but other pictures


def test_default_layout_counts_and_metadata(synth_root):
    products = sorted(p.name for p in synth_root.iterdir() if p.is_dir())
    assert products == sorted(list(PRODUCTS)[:2])
    for product in products:
        pdir = synth_root / product
        assert len(list((pdir / "train" / "good").glob("*.png"))) == 40
        assert len(list((pdir / "test" / "good").glob("*.png"))) == 10
        for defect in PRODUCTS[product]:
            images = sorted(p.stem for p in (pdir / "test" / defect).glob("*.png"))
            masks = sorted(p.stem for p in (pdir / "ground_truth" / defect).glob("*.png"))
            assert len(images) == 12
            assert masks == [f"{s}_mask" for s in images]
    with open(synth_root / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"split", "product", "cls", "id", "group", "exposure"}
    assert len(rows) == 2 * (40 + 10 + 3 * 12)
    # two exposures per group: each group holds exactly two images
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    assert set(sizes.values()) == {2}


def test_grayscale_product_is_saved_as_8bit_grayscale(synth_root):
    gray = [p for p in list(PRODUCTS)[:2] if p in GRAYSCALE]
    assert gray, "the default two products should include a grayscale one"
    for product in PRODUCTS:
        if (synth_root / product).is_dir():
            with Image.open(next((synth_root / product / "train" / "good").glob("*.png"))) as im:
                assert im.mode == ("L" if product in GRAYSCALE else "RGB")


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="products must be"):
        write_synthetic(tmp_path / "x", products=9)
    with pytest.raises(ValueError, match="size must be"):
        write_synthetic(tmp_path / "x", size=8)
    with pytest.raises(ValueError, match="unknown synthetic product"):
        render_sample(0, "glass", "hole", 0, 0, 32)
    with pytest.raises(ValueError, match="has no synthetic defect"):
        render_sample(0, "wood", "stain", 0, 0, 32)


# --------------------------------------------------------------------------------- exact masks
@pytest.mark.parametrize("product", list(PRODUCTS))
def test_masks_are_exactly_the_changed_pixels(product):
    for defect in PRODUCTS[product]:
        for group in range(3):
            for exposure in (0, 1):
                s = render_sample(0, product, defect, group, exposure, 64)
                assert s.mask.dtype == bool and s.mask.any(), (product, defect, group)
                changed = np.any(s.image != s.clean, axis=-1)
                # inside: every mask pixel differs from the clean texture; outside: untouched
                assert np.array_equal(changed, s.mask), (product, defect, group, exposure)
    good = render_sample(0, product, "good-train", 0, 0, 64)
    assert not good.mask.any() and np.array_equal(good.image, good.clean)


def test_files_on_disk_are_the_rendered_samples(synth_root):
    """The written image and 0/255 mask are the rendered arrays, with ids ``2*group + exposure``."""
    for product in list(PRODUCTS)[:2]:
        for defect in PRODUCTS[product]:
            for i in (0, 5, 11):
                s = render_sample(0, product, defect, i // 2, i % 2, 64)
                img = np.asarray(Image.open(synth_root / product / "test" / defect / f"{i:03d}.png"))
                mask = np.asarray(Image.open(synth_root / product / "ground_truth" / defect / f"{i:03d}_mask.png"))
                expected = s.image[..., 0] if product in GRAYSCALE else s.image
                assert np.array_equal(img, expected)
                assert set(np.unique(mask).tolist()) == {0, 255}
                assert np.array_equal(mask == 255, s.mask)


def test_group_members_share_the_defect_and_differ_in_exposure():
    a = render_sample(3, "fabric", "scratch", 2, 0, 64)
    b = render_sample(3, "fabric", "scratch", 2, 1, 64)
    c = render_sample(3, "fabric", "scratch", 3, 0, 64)
    assert np.array_equal(a.mask, b.mask)          # one physical part ...
    assert b.image.mean() > a.image.mean() + 5     # ... at a brighter exposure
    assert not np.array_equal(a.mask, c.mask)      # another part, another defect


# ----------------------------------------------------------------------- defect types differ
def _stats(product: str, defect: str, size: int = 128, groups: int = 6) -> dict[str, float]:
    """Mean over groups of: area fraction, erosion survival (thin ~0, blob ~1), signed change
    inside the mask, share of brightened and darkened mask pixels, and the largest |change|."""
    acc: dict[str, list[float]] = {k: [] for k in ("area", "solid", "delta", "brighter", "darker", "peak")}
    for g in range(groups):
        s = render_sample(0, product, defect, g, 0, size)
        m = s.mask
        delta = s.image.astype(np.int32).mean(-1) - s.clean.astype(np.int32).mean(-1)
        acc["area"].append(m.mean())
        acc["solid"].append(ndimage.binary_erosion(m).sum() / m.sum())
        acc["delta"].append(delta[m].mean())
        acc["brighter"].append((delta[m] > 10).mean())
        acc["darker"].append((delta[m] < -10).mean())
        acc["peak"].append(np.abs(delta[m]).max())
    return {k: float(np.mean(v)) for k, v in acc.items()}


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_defect_types_differ_in_shape_and_appearance(product):
    st = {d: _stats(product, d) for d in PRODUCTS[product]}
    thin = [d for d in st if d in ("scratch", "crack")]
    blobs = [d for d in st if d in ("hole", "stain")]
    # shape: lines are thin (one erosion removes most of them), blobs are solid
    for t in thin:
        for b in blobs:
            assert st[t]["solid"] < 0.5 < st[b]["solid"], (product, t, b, st)
    # appearance: a scratch brightens, a crack darkens, a hole has a dark core and a light rim,
    # a stain is the largest and gentlest (soft blob, smaller peak change than a hole)
    if "scratch" in st:
        assert st["scratch"]["brighter"] > 0.95 and st["scratch"]["delta"] > 40
    if "crack" in st:
        assert st["crack"]["darker"] > 0.95 and st["crack"]["delta"] < -40
    if "hole" in st:
        assert st["hole"]["darker"] > 0.3 and st["hole"]["brighter"] > 0.2
    if "stain" in st:
        assert st["stain"]["area"] > max(v["area"] for d, v in st.items() if d != "stain")
        assert st["stain"]["peak"] < min(v["peak"] for d, v in st.items() if d != "stain")


# ---------------------------------------------------------------------------- data check on it
def test_data_check_on_synthetic_prints_counts_and_exits_0(synth_root, capsys):
    assert main(["data", "check", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "0 bad samples, 0 structural issues" in out
    assert f"{2 * (40 + 10 + 3 * 12)} images" in out
    for product in list(PRODUCTS)[:2]:
        assert f"product {product}: 3 defect types ({', '.join(sorted(PRODUCTS[product]))})" in out
        lines = [ln.split() for ln in out.splitlines() if ln.strip().startswith(product + " ")]
        table = {(ln[1], ln[2]): (int(ln[3]), int(ln[4]), int(ln[5])) for ln in lines}
        assert table[("train", "good")] == (0, 40, 0)
        assert table[("test", "good")] == (0, 10, 0)
        for cid, defect in enumerate(sorted(PRODUCTS[product]), start=1):
            assert table[("test", defect)] == (cid, 12, 0)
    assert "grayscale" in out and "colour" in out
