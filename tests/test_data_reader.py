"""MVTec-layout reader: counts, class-id order, shapes, grayscale, both mask styles, and clear errors.

Why these matter: every generator and metric consumes the reader's rows. A wrong class order or a
binary mask mapped to the wrong id mislabels silently; a grayscale image with one channel breaks
every 3-channel model far from the cause; a missing folder must say which folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.data.mvtec import load_rows, load_sample, read_native, scan_dataset
from defectforge.data.sample import BadSampleError, DataError
from defectforge.data.synth import PRODUCTS

W, H = 30, 20  # tiny trees use a non-square native size, so resizing is always exercised


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_product(pdir: Path, classes=("a", "b"), n_good: int = 3, n_defect: int = 2, gray: bool = False,
                 seed: int = 0) -> Path:
    """A tiny MVTec product: train/good, test/good, test/<c> + 0/255 masks (a rectangle per image)."""
    rng = np.random.default_rng(seed)

    def picture():
        if gray:
            return rng.integers(0, 256, (H, W), dtype=np.uint8)
        return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)

    for i in range(n_good):
        _png(pdir / "train" / "good" / f"{i:03d}.png", picture())
        _png(pdir / "test" / "good" / f"{i:03d}.png", picture())
    for c in classes:
        for i in range(n_defect):
            _png(pdir / "test" / c / f"{i:03d}.png", picture())
            mask = np.zeros((H, W), np.uint8)
            mask[2 + i: 8 + i, 3:12] = 255
            _png(pdir / "ground_truth" / c / f"{i:03d}_mask.png", mask)
    return pdir


# ------------------------------------------------------------------------------- counts, order
def test_scan_counts_products_and_class_order(synth_root):
    index = scan_dataset(synth_root)
    assert index.products == ["fabric", "metal"]
    assert index.issues == []
    for product in index.products:
        assert index.classes[product] == tuple(sorted(PRODUCTS[product]))
        refs = [r for r in index.refs if r.product == product]
        assert sum(r.split == "train" and r.is_good for r in refs) == 40
        assert sum(r.split == "test" and r.is_good for r in refs) == 10
        for cid, defect in enumerate(index.classes[product], start=1):
            these = [r for r in refs if r.defect == defect]
            assert len(these) == 12 and all(r.split == "test" for r in these)
            assert [r.id for r in these] == [f"{i:03d}" for i in range(12)]
            assert all(r.mask_path == synth_root / product / "ground_truth" / defect / f"{r.id}_mask.png"
                       for r in these)
            assert index.class_id(product, defect) == cid
    assert index.class_id("fabric", "good") == 0
    with pytest.raises(DataError, match="no defect class 'crack'"):
        index.class_id("fabric", "crack")


def test_classes_json_overrides_the_class_order(tmp_path):
    pdir = make_product(tmp_path / "widget", classes=("a", "b"))
    (pdir / "classes.json").write_text('{"classes": ["b", "dent", "a"]}')
    index = scan_dataset(pdir)
    assert index.classes["widget"] == ("b", "dent", "a")  # recorded order, incl. a class with no images
    row_a = load_sample(next(r for r in index.refs if r.defect == "a"), index.classes["widget"], 16)
    row_b = load_sample(next(r for r in index.refs if r.defect == "b"), index.classes["widget"], 16)
    assert set(np.unique(row_a["mask"]).tolist()) == {0, 3}
    assert set(np.unique(row_b["mask"]).tolist()) == {0, 1}


@pytest.mark.parametrize("text, match", [
    ('{"classes": ["a"]}', "lacks defect folder"),
    ('{"classes": ["a", "b", "a"]}', "list of unique defect names"),
    ('{"classes": ["good", "a", "b"]}', "list of unique defect names"),
    ("{not json", "not readable JSON"),
])
def test_bad_classes_json_names_the_file(tmp_path, text, match):
    pdir = make_product(tmp_path / "widget", classes=("a", "b"))
    (pdir / "classes.json").write_text(text)
    with pytest.raises(DataError, match=match) as err:
        scan_dataset(pdir)
    assert str(pdir / "classes.json") in str(err.value)


def test_ids_sort_numerically(tmp_path):
    pdir = tmp_path / "p"
    for sid in ("10", "2", "1", "x"):
        _png(pdir / "train" / "good" / f"{sid}.png", np.zeros((H, W, 3), np.uint8))
    assert [r.id for r in scan_dataset(pdir).refs] == ["1", "2", "10", "x"]


# ----------------------------------------------------------------------------- shapes, channels
@pytest.mark.parametrize("resolution", [32, 96])
def test_rows_have_the_requested_resolution(synth_root, resolution):
    index = scan_dataset(synth_root)
    for product in index.products:
        classes = index.classes[product]
        good = next(r for r in index.good_refs("train") if r.product == product)
        row = load_sample(good, classes, resolution)
        assert set(row) == {"image", "mask", "product", "defect", "id", "split"}
        assert row["image"].shape == (resolution, resolution, 3) and row["image"].dtype == np.uint8
        assert row["mask"].shape == (resolution, resolution) and row["mask"].dtype == np.uint8
        assert not row["mask"].any()
        assert (row["product"], row["defect"], row["id"], row["split"]) == (product, "good", good.id, "train")
        for defect in classes:
            ref = next(r for r in index.defect_refs(product) if r.defect == defect)
            row = load_sample(ref, classes, resolution)
            assert row["image"].shape == (resolution, resolution, 3)
            assert row["mask"].shape == (resolution, resolution)
            assert set(np.unique(row["mask"]).tolist()) == {0, index.class_id(product, defect)}


def test_grayscale_is_repeated_to_three_channels(tmp_path):
    pdir = make_product(tmp_path / "gray", gray=True)
    index = scan_dataset(pdir)
    ref = next(r for r in index.defect_refs())
    native = read_native(ref, index.classes["gray"])
    source = np.asarray(Image.open(ref.image_path))
    assert source.ndim == 2 and native.mode == "L"
    assert native.image.shape == (H, W, 3)
    for ch in range(3):
        assert np.array_equal(native.image[..., ch], source)
    row = load_sample(ref, index.classes["gray"], 16)
    assert row["image"].shape == (16, 16, 3)
    assert np.array_equal(row["image"][..., 0], row["image"][..., 1])
    assert np.array_equal(row["image"][..., 0], row["image"][..., 2])


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    pdir = make_product(tmp_path / "deep", classes=("a",), n_good=1, n_defect=1, gray=True)
    path = pdir / "train" / "good" / "000.png"
    _png(path, np.full((H, W), 65535, np.uint16))  # Pillow saves uint16 as an I;16 PNG
    native = read_native(scan_dataset(pdir).refs[0], ("a",))
    assert native.mode.startswith("I") and native.image.shape == (H, W, 3) and int(native.image.min()) == 255


# ------------------------------------------------------------------------------------ masks
def test_binary_masks_map_to_the_folders_class_id(tmp_path):
    pdir = make_product(tmp_path / "p", classes=("a", "b", "c"))
    # one mask saved as a 1-bit image: the same 0/255 meaning
    one_bit = pdir / "ground_truth" / "c" / "001_mask.png"
    Image.open(one_bit).convert("1").save(one_bit)
    index = scan_dataset(pdir)
    for ref in index.defect_refs():
        raw = np.asarray(Image.open(ref.mask_path).convert("L"))
        native = read_native(ref, index.classes["p"])
        cid = index.class_id("p", ref.defect)
        assert np.array_equal(native.mask, np.where(raw > 0, cid, 0).astype(np.uint8)), ref


def test_class_id_masks_are_taken_as_is(tmp_path):
    pdir = make_product(tmp_path / "p", classes=("a", "b", "c"))
    ids = np.zeros((H, W), np.uint8)
    ids[2:8, 3:12] = 2       # the folder's own class ("b") ...
    ids[12:16, 20:28] = 3    # ... and another defect type in the same picture (Defect Spectrum style)
    _png(pdir / "ground_truth" / "b" / "000_mask.png", ids)
    index = scan_dataset(pdir)
    ref = next(r for r in index.defect_refs() if (r.defect, r.id) == ("b", "000"))
    assert np.array_equal(read_native(ref, index.classes["p"]).mask, ids)
    # nearest resizing keeps ids ids (no blends like 2.5 between classes)
    row = load_sample(ref, index.classes["p"], 64)
    assert set(np.unique(row["mask"]).tolist()) == {0, 2, 3}


def test_zero_one_mask_in_a_later_class_folder_is_not_silently_relabelled(tmp_path):
    """A 0/1 mask in folder "c" (class 3) would otherwise read as class 1 ("a"): a silent mislabel."""
    pdir = make_product(tmp_path / "p", classes=("a", "b", "c"))
    m = np.zeros((H, W), np.uint8)
    m[2:8, 3:12] = 1
    _png(pdir / "ground_truth" / "c" / "000_mask.png", m)
    _png(pdir / "ground_truth" / "a" / "000_mask.png", m)  # in folder "a" a 0/1 mask *is* class 1
    index = scan_dataset(pdir)
    ref_c = next(r for r in index.defect_refs() if (r.defect, r.id) == ("c", "000"))
    ref_a = next(r for r in index.defect_refs() if (r.defect, r.id) == ("a", "000"))
    with pytest.raises(BadSampleError, match="class id 3") as err:
        read_native(ref_c, index.classes["p"])
    assert err.value.path == ref_c.mask_path
    assert np.array_equal(read_native(ref_a, index.classes["p"]).mask, m)


def test_load_rows_lists_every_bad_sample_or_skips_them(tmp_path):
    pdir = make_product(tmp_path / "p", classes=("a", "b"))
    (pdir / "ground_truth" / "a" / "000_mask.png").unlink()
    _png(pdir / "ground_truth" / "b" / "001_mask.png", np.zeros((H, W), np.uint8))
    index = scan_dataset(pdir)
    with pytest.raises(DataError) as err:
        load_rows(index, None, 16)
    msg = str(err.value)
    assert "2 bad sample(s)" in msg
    assert str(pdir / "ground_truth" / "a" / "000_mask.png") in msg and "mask file not found" in msg
    assert str(pdir / "ground_truth" / "b" / "001_mask.png") in msg and "empty defect mask" in msg
    rows, bad = load_rows(index, None, 16, on_bad_sample="skip")
    assert len(rows) == len(index.refs) - 2
    assert {p.name for p, _ in bad} == {"000_mask.png", "001_mask.png"}
    with pytest.raises(DataError, match="on_bad_sample must be"):
        load_rows(index, None, 16, on_bad_sample="ignore")


# ------------------------------------------------------------------- folders and products
def test_single_product_folder_equals_that_product_in_a_root(synth_root):
    whole = scan_dataset(synth_root)
    single = scan_dataset(synth_root / "fabric")
    assert single.products == ["fabric"]
    assert single.classes == {"fabric": whole.classes["fabric"]}
    assert single.refs == whole.for_product("fabric").refs
    chosen = scan_dataset(synth_root, ["metal"])
    assert chosen.products == ["metal"] and {r.product for r in chosen.refs} == {"metal"}
    assert scan_dataset(synth_root, ["metal", "fabric"]).products == ["metal", "fabric"]


def test_unknown_product_names_it(synth_root):
    with pytest.raises(DataError, match="'glass'") as err:
        scan_dataset(synth_root, ["fabric", "glass"])
    assert "fabric" in str(err.value) and "metal" in str(err.value)  # and says what exists
    with pytest.raises(DataError, match="unknown product 'glass'"):
        scan_dataset(synth_root).for_product("glass")
    with pytest.raises(DataError, match="'metal'"):
        scan_dataset(synth_root / "fabric", ["metal"])


def test_missing_or_empty_folders_are_data_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="not found") as err:
        scan_dataset(missing)
    assert str(missing) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no product folders") as err:
        scan_dataset(empty)
    assert str(empty) in str(err.value)

    hollow = tmp_path / "root" / "hollow"
    (hollow / "train" / "good").mkdir(parents=True)
    (hollow / "test").mkdir()
    with pytest.raises(DataError, match="'hollow' has no images") as err:
        scan_dataset(tmp_path / "root")
    assert str(hollow) in str(err.value)


def test_structural_oddities_are_recorded_not_raised(tmp_path):
    root = tmp_path / "root"
    pdir = make_product(root / "p")
    (root / "notes").mkdir()
    (pdir / "extra").mkdir()
    (pdir / "test" / "a" / "readme.txt").write_text("x")
    shutil.copy(pdir / "ground_truth" / "a" / "000_mask.png", pdir / "ground_truth" / "a" / "099_mask.png")
    index = scan_dataset(root)
    flagged = {p for p, _ in index.issues}
    assert flagged == {root / "notes", pdir / "extra", pdir / "test" / "a" / "readme.txt",
                       pdir / "ground_truth" / "a" / "099_mask.png"}
    assert len(index.refs) == 3 + 3 + 2 * 2
