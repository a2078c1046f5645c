"""Downstream segmentation: metrics, the leak-free selection protocol, and the gain report."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from defectforge.evaluate import segmentation as seg
from defectforge.evaluate.seg_metrics import f1_max, iou_at, segmentation_metrics, subsample_pixels
from defectforge.evaluate.segmenter import SegUNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why


def make_row(i: int, defect: str = "scratch", split: str = "train", size: int = 32,
             product: str = "p") -> dict:
    """A textured image; defect rows carry a bright square whose mask is exact."""
    rng = np.random.default_rng([i, zlib.crc32(f"{product}/{defect}/{split}".encode())])
    img = rng.integers(60, 100, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if defect != "good":
        y, x = rng.integers(2, size - 10, 2)
        mask[y:y + 7, x:x + 7] = 1
        img[mask > 0] = 210
    return dict(image=img, mask=mask, product=product, defect=defect, id=f"{split}-{defect}-{i:03d}",
                split=split)


def real_rows(n_defect: int = 8, n_good: int = 8, split: str = "train", start: int = 0) -> list[dict]:
    return ([make_row(start + i, "scratch", split) for i in range(n_defect)]
            + [make_row(start + i, "good", split) for i in range(n_good)])


FAST = dict(base=8, levels=2, batch_size=4)


# ------------------------------------------------------------------------------------- metrics
def test_perfect_prediction_scores_one():
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, 1:3, 1:3] = 2  # class id 2: any id > 0 is defect
    m = segmentation_metrics(masks.astype(float) / 2, masks)
    for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "miou", "iou_defect", "iou_background",
              "image_auroc", "image_ap"):
        assert m[k] == pytest.approx(1.0), k


def test_inverted_prediction_has_auroc_zero():
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, 1:3, 1:3] = 1
    assert segmentation_metrics(1.0 - masks, masks)["pixel_auroc"] == pytest.approx(0.0)
    # image level: the defect image gets the lowest max-probability
    probs = np.stack([np.full((4, 4), 0.1), np.full((4, 4), 0.9)])
    assert segmentation_metrics(probs, masks)["image_auroc"] == pytest.approx(0.0)


def test_metrics_match_hand_computation():
    # scores 0.1 0.4 / 0.35 0.8 with labels 0 0 / 1 1:
    # positive-negative pairs ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4) of 4 -> AUROC 0.75;
    # ranked 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5*1 + 0.5*(2/3) = 5/6;
    # F1 at t=0.8: P=1 R=.5 -> 2/3; at t=0.35: P=2/3 R=1 -> 0.8 (the max);
    # at t=0.35: predicted {0.4,0.35,0.8}: defect IoU 2/3, background IoU |{0.1}|/|{0.1,0.4}| = 1/2.
    probs = np.array([[[0.1, 0.4], [0.35, 0.8]]])
    masks = np.array([[[0, 0], [1, 1]]], np.uint8)
    m = segmentation_metrics(probs, masks)
    assert m["pixel_auroc"] == pytest.approx(0.75)
    assert m["pixel_ap"] == pytest.approx(5 / 6)
    assert m["pixel_f1_max"] == pytest.approx(0.8)
    assert m["f1_threshold"] == pytest.approx(0.35)
    assert m["iou_defect"] == pytest.approx(2 / 3)
    assert m["iou_background"] == pytest.approx(0.5)
    assert m["miou"] == pytest.approx(7 / 12)


def test_image_metrics_use_max_pixel_probability():
    masks = np.zeros((3, 2, 2), np.uint8)
    masks[0, 0, 0] = 1
    probs = np.zeros((3, 2, 2))
    probs[0, 1, 1], probs[1, 0, 0], probs[2, 0, 1] = 0.3, 0.2, 0.5  # maxima 0.3 (defect), 0.2, 0.5
    m = segmentation_metrics(probs, masks)
    assert m["image_auroc"] == pytest.approx(0.5)   # beats 0.2, loses to 0.5
    assert m["image_ap"] == pytest.approx(0.5)      # ranked 0.5(-) 0.3(+): precision 1/2 at recall 1


def test_helpers_and_degenerate_inputs():
    assert f1_max(np.array([False, True]), np.array([0.2, 0.7])) == (pytest.approx(1.0), pytest.approx(0.7))
    assert iou_at(np.array([True, False]), np.array([0.9, 0.1]), 0.5) == (1.0, 1.0)
    m = segmentation_metrics(np.random.default_rng(0).random((2, 3, 3)), np.zeros((2, 3, 3), np.uint8))
    assert math.isnan(m["pixel_auroc"]) and math.isnan(m["pixel_f1_max"]) and math.isnan(m["image_ap"])
    assert m["iou_background"] == 1.0  # nothing predicted defect when there is no defect
    with pytest.raises(ValueError, match="does not match"):
        segmentation_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), np.uint8))


def test_pixel_subsample_is_deterministic_and_bounded():
    rng = np.random.default_rng(0)
    scores, labels = rng.random(10_000), rng.random(10_000) > 0.9
    a = subsample_pixels(scores, labels, max_pixels=1000)
    b = subsample_pixels(scores, labels, max_pixels=1000)
    assert a[0].size == 1000 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    probs, masks = rng.random((4, 50, 50)), (rng.random((4, 50, 50)) > 0.9).astype(np.uint8)
    full = segmentation_metrics(probs, masks)
    sub = segmentation_metrics(probs, masks, max_pixels=5000)
    assert sub == segmentation_metrics(probs, masks, max_pixels=5000)
    assert sub["pixel_auroc"] == pytest.approx(full["pixel_auroc"], abs=0.05)


# --------------------------------------------------------------------------------------- model
def test_segmenter_keeps_any_input_size():
    model = SegUNet(base=4, levels=3).eval()
    out = model(torch.rand(2, 3, 30, 45))
    assert out.shape == (2, 1, 30, 45)
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(2, 1, 32, 32))


# ----------------------------------------------------------------------- selection never sees test
def test_test_rows_in_training_or_validation_are_rejected():
    train, val = real_rows(4, 4), real_rows(2, 2, split="val", start=50)
    bad = make_row(99, "scratch", "test")
    with pytest.raises(ValueError, match="test split"):
        seg.train_segmenter(train, val + [bad], steps=1, seed=0, **FAST)
    with pytest.raises(ValueError, match="test split"):
        seg.train_segmenter(train + [bad], val, steps=1, seed=0, **FAST)
    with pytest.raises(ValueError, match="test split"):
        seg.run_one("real", train + [bad], [], real_rows(2, 2, "test", 80), seed=0, steps=1, **FAST)


def test_leaks_by_identical_images_are_rejected():
    train, val, test = real_rows(6, 6), real_rows(2, 2, "val", 50), real_rows(2, 2, "test", 80)
    with pytest.raises(ValueError, match="share an image"):
        seg.train_segmenter(train + [dict(val[0], split="train", id="renamed")], val, steps=1, seed=0, **FAST)
    with pytest.raises(ValueError, match="share an image"):
        seg.run_one("real", train, [], test + [dict(train[0], split="test")], seed=0, steps=1, **FAST)


def test_selection_only_evaluates_validation_rows(monkeypatch):
    calls: list[set[str]] = []
    original = seg.evaluate_segmenter

    def recording(model, rows, *args, **kwargs):
        calls.append({seg.row_name(r) for r in rows})
        return original(model, rows, *args, **kwargs)

    monkeypatch.setattr(seg, "evaluate_segmenter", recording)
    train, test = real_rows(8, 8), real_rows(4, 4, "test", start=100)
    synthetic = [dict(make_row(200 + i, "scratch", "train"), id=f"syn-{i}") for i in range(4)]
    out = seg.run_one("real+synthetic", train, synthetic, test, seed=0, steps=6, eval_every=2, **FAST)
    val_names = set(out["info"]["val_rows"])
    test_names = {seg.row_name(r) for r in test}
    assert len(out["info"]["history"]) == 3 and len(calls) == 4  # 3 validations, then 1 test
    assert all(c == val_names for c in calls[:-1])
    assert all(not (c & test_names) for c in calls[:-1])
    assert calls[-1] == test_names
    best = max(out["info"]["history"], key=lambda h: h["val_pixel_ap"])
    assert out["info"]["best_step"] == best["step"]
    assert out["info"]["best_val_pixel_ap"] == best["val_pixel_ap"]


def test_training_is_seeded_and_returns_the_selected_state():
    train, val = real_rows(6, 6), real_rows(2, 2, "val", 50)
    m1, i1 = seg.train_segmenter(train, val, steps=4, seed=3, eval_every=2, **FAST)
    m2, i2 = seg.train_segmenter(train, val, steps=4, seed=3, eval_every=2, **FAST)
    assert i1["history"] == i2["history"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    # the returned model is the selected one: its validation AP is the recorded best
    assert seg.evaluate_segmenter(m1, val)["pixel_ap"] == pytest.approx(i1["best_val_pixel_ap"], abs=1e-6)


# --------------------------------------------------------------------------------- carve + mixing
def test_validation_carve_is_disjoint_stratified_and_deterministic():
    rows = real_rows(10, 10) + [make_row(i, "hole", product="q") for i in range(5)]
    train, val = seg.carve_validation_rows(rows, 0.2, seed=7)
    names = lambda rs: [seg.row_name(r) for r in rs]  # noqa: E731
    assert not set(names(train)) & set(names(val))
    assert sorted(names(train) + names(val)) == sorted(names(rows))
    assert {(r["product"], r["defect"]) for r in val} == {("p", "scratch"), ("p", "good"), ("q", "hole")}
    assert len(val) == 2 + 2 + 1 and all(r["split"] == "val" for r in val)
    again = seg.carve_validation_rows(list(reversed(rows)), 0.2, seed=7)
    assert names(again[0]) == names(train) and names(again[1]) == names(val)
    other = seg.carve_validation_rows(rows, 0.2, seed=8)
    assert names(other[1]) != names(val)
    with pytest.raises(ValueError, match="no defect pixels"):
        seg.carve_validation_rows([make_row(0, "scratch")] + real_rows(0, 6), 0.2, seed=0)
    # can_carve_validation says in advance what the carve will find (evaluate skips segmentation on it)
    one_each = [make_row(0, "scratch"), make_row(0, "hole")] + real_rows(0, 6)
    assert not seg.can_carve_validation(one_each)
    assert seg.can_carve_validation(one_each + [make_row(1, "hole")])
    seg.carve_validation_rows(one_each + [make_row(1, "hole")], 0.2, seed=0)  # and the carve succeeds


def test_mix_synthetic_ratio_and_tagging():
    train = real_rows(4, 6)
    synthetic = [dict(make_row(300 + i, "scratch"), id=f"syn-{i}") for i in range(3)]
    mixed = seg.mix_synthetic(train, synthetic, ratio=2.0, seed=0)  # 2 x 4 defect rows = 8 > 3: cycles
    added = mixed[len(train):]
    assert mixed[:len(train)] == train and len(added) == 8
    assert all(r["split"] == "synthetic" for r in added)
    assert {r["id"] for r in added[:3]} == {"syn-0", "syn-1", "syn-2"}  # one full pass before repeats
    assert [r["id"] for r in added] == [r["id"] for r in seg.mix_synthetic(train, synthetic, 2.0, 0)[len(train):]]
    assert len(seg.mix_synthetic(train, synthetic, ratio=0.5, seed=0)) == len(train) + 2


# ---------------------------------------------------------------------------- the real thing
def _lowest_third_rows(root, resolution=64):
    """train = first third (numeric id order) of each defect type + train/good; test = the rest."""
    from defectforge.data.mvtec import load_sample, scan_dataset
    from defectforge.data.sample import id_sort_key

    index = scan_dataset(root)
    train, test, by_type = [], [], {}
    for ref in index.refs:
        if ref.is_good:
            (train if ref.split == "train" else test).append(ref)
        else:
            by_type.setdefault((ref.product, ref.defect), []).append(ref)
    for refs in by_type.values():
        refs.sort(key=lambda r: id_sort_key(r.id))
        train += refs[:len(refs) // 3]
        test += refs[len(refs) // 3:]
    load = lambda refs, split: [dict(load_sample(r, index.classes[r.product], resolution), split=split)  # noqa: E731
                                for r in refs]
    return load(train, "train"), load(test, "test")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_segmenter_trained_on_real_synthetic_data_detects_defects(synth_root, seed):
    train_rows, test_rows = _lowest_third_rows(synth_root)
    train, val = seg.carve_validation_rows(train_rows, 0.2, seed)
    model, info = seg.train_segmenter(train, val, steps=100, seed=seed)
    metrics = seg.evaluate_segmenter(model, test_rows)
    assert metrics["pixel_auroc"] > 0.8, (metrics, info["history"])
    assert metrics["pixel_ap"] > 0.2, metrics  # defect pixels are ~2% of the test pixels


# ------------------------------------------------------------------------------ downstream gain
def test_downstream_gain_structure_and_arithmetic():
    real, test = real_rows(6, 6), real_rows(4, 4, "test", start=100)
    synthetic = [dict(r, image=np.ascontiguousarray(r["image"][:, ::-1]),
                      mask=np.ascontiguousarray(r["mask"][:, ::-1]), id=f"flip-{r['id']}")
                 for r in real if r["defect"] != "good"]
    out = seg.downstream_gain(real, synthetic, test, seeds=(0, 1), steps=4, eval_every=2, **FAST)
    a, b = seg.REAL, seg.MIXED
    assert out["seeds"] == [0, 1] and len(out["per_seed"]) == 2 and len(out["runs"]) == 4
    for s in out["per_seed"]:
        for m in seg.AGGREGATED:
            assert s["gain"][m] == pytest.approx(s[b][m] - s[a][m], nan_ok=True)
    for cond in (a, b, "gain"):
        for m in seg.AGGREGATED:
            vals = np.array([s[cond][m] for s in out["per_seed"]])
            assert out[cond][m]["mean"] == pytest.approx(vals.mean(), nan_ok=True)
            assert out[cond][m]["std"] == pytest.approx(vals.std(ddof=1), nan_ok=True)
    assert out["gain"]["pixel_ap"]["mean"] == pytest.approx(
        out[b]["pixel_ap"]["mean"] - out[a]["pixel_ap"]["mean"])
    runs = {(r["condition"], r["seed"]): r for r in out["runs"]}
    for seed in (0, 1):
        ra, rb = runs[(a, seed)]["info"], runs[(b, seed)]["info"]
        assert ra["val_rows"] == rb["val_rows"]          # both conditions selected on one val split
        assert ra["n_synthetic"] == 0
        n_real_defect_train = 6 - 1                      # one of 6 defect rows carved into val
        assert rb["n_synthetic"] == n_real_defect_train  # ratio 1:1
        assert rb["n_train"] == ra["n_train"] + n_real_defect_train
    with pytest.raises(ValueError, match="no result for condition"):
        seg.aggregate_runs([r for r in out["runs"] if r["condition"] == a])


# ------------------------------------------------------------------ the real-only baseline cache
def _seg_world() -> tuple[dict, list[dict]]:
    real = {"few_shot": real_rows(6, 0), "good_train": [make_row(i, "good") for i in range(6)],
            "test": real_rows(3, 3, "test", 100)}
    synthetic = [make_row(i, "scratch", "synthetic", product="p") for i in range(200, 206)]
    block = {k: np.asarray([r[k] for r in synthetic], dtype=object if k not in ("image", "mask") else None)
             for k in ("image", "mask", "product", "defect", "id")}
    return real, [block]


def test_real_seg_key_changes_with_every_input():
    from defectforge.evaluate.run import real_seg_key

    real, _ = _seg_world()
    train, test = real["few_shot"] + real["good_train"], real["test"]
    key = real_seg_key(train, test, 0, 10)
    assert key == real_seg_key([dict(r) for r in train], test, 0, 10)  # content, not identity
    assert key != real_seg_key(train, test, 1, 10)
    assert key != real_seg_key(train, test, 0, 11)
    moved = [dict(r) for r in train]
    moved[0] = {**moved[0], "image": moved[0]["image"].copy()}
    moved[0]["image"][0, 0, 0] ^= 1  # one bit of one pixel
    assert key != real_seg_key(moved, test, 0, 10)
    relabelled = [dict(r) for r in test]
    relabelled[0] = {**relabelled[0], "mask": np.zeros_like(relabelled[0]["mask"])}
    assert key != real_seg_key(train, relabelled, 0, 10)


def test_real_only_runs_are_cached_and_equal_a_fresh_run(ray_session, tmp_path):
    """A sweep computes the real-only baseline once: the second evaluation reads it from the cache
    (shown by a tampered entry coming back), and the cached figures are the ones a fresh run gives."""
    import json

    from defectforge.evaluate.run import run_segmentation

    real, blocks = _seg_world()
    refs = [ray_session.put(b) for b in blocks]
    cache = tmp_path / "cache"
    first = run_segmentation(real, ["p"], refs, [0, 1], steps=6, ratio=1.0, cache_dir=cache)["p"]
    assert not any(r.get("cached") for r in first["runs"])
    files = sorted(cache.glob("*.json"))
    assert len(files) == 2  # one real-only run per seed; mixed runs are never cached

    fresh = run_segmentation(real, ["p"], refs, [0, 1], steps=6, ratio=1.0, cache_dir=None)["p"]
    second = run_segmentation(real, ["p"], refs, [0, 1], steps=6, ratio=1.0, cache_dir=cache)["p"]
    assert sum(bool(r.get("cached")) for r in second["runs"]) == 2
    for a in (fresh, second):  # deterministic: cached == recomputed, for both conditions
        assert a["real"] == first["real"] and a["real+synthetic"] == first["real+synthetic"]
        assert a["gain"] == first["gain"]

    entry = json.loads(files[0].read_text())
    entry["metrics"]["pixel_ap"] = 0.123
    files[0].write_text(json.dumps(entry))
    files[1].write_text("{ damaged")
    third = run_segmentation(real, ["p"], refs, [0, 1], steps=6, ratio=1.0, cache_dir=cache)["p"]
    real_runs = [r for r in third["runs"] if r["condition"] == "real"]
    assert [r.get("cached", False) for r in sorted(real_runs, key=lambda r: r["seed"])].count(True) == 1
    assert 0.123 in [r["metrics"]["pixel_ap"] for r in real_runs]  # read, not recomputed
    assert json.loads(files[1].read_text())["condition"] == "real"  # the damaged entry was rewritten
