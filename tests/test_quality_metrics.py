"""Defect-quality metrics on hand-made pairs whose answer is known.

Why hand-made: each metric exists to catch one failure mode (invisible defects, noise instead of
structure, wrong-size or empty masks, copies of training images). The pairs below are built to have
or lack exactly that property, so each test says what the metric must see, not what it happens to
print: real pairs score ~1 against other real pairs of the same process, noise pasted into the
mask scores high on high-frequency energy, a defect-free image under a real mask has no contrast,
and a copy of a training image has distance 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from defectforge.evaluate.metrics import (
    concat_stats,
    mean_over_types,
    nn_distance,
    pair_stats,
    quality_from_stats,
    quality_metrics,
    thumbnails,
    visibility,
)
from defectforge.evaluate.metrics.quality import default_ring_px, mask_area, to_gray

SIZE = 64


def _background(rng: np.random.Generator) -> np.ndarray:
    """A defect-free surface: mid grey, a gentle gradient and fine texture noise (3 equal channels)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    g = 120 + 0.3 * xx + rng.normal(0, 4, (SIZE, SIZE))
    return np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _mask(rng: np.random.Generator) -> np.ndarray:
    """An elliptical defect of random size and place, class id 1."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx = rng.uniform(16, SIZE - 16, 2)
    ry, rx = rng.uniform(4, 9, 2)
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _real_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defective image, mask, the same surface without the defect): a dark, slightly blurred dent."""
    normal = _background(rng)
    mask = _mask(rng)
    depth = rng.uniform(45, 60)
    dent = ndimage.gaussian_filter(mask.astype(np.float64) * depth, 1.0)
    img = np.clip(normal.astype(np.float64) - dent[..., None], 0, 255).astype(np.uint8)
    return img, mask, normal


def _pairs(seed: int, n: int) -> tuple[list, list, list]:
    rng = np.random.default_rng(seed)
    out = [_real_pair(rng) for _ in range(n)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


@pytest.fixture(scope="module")
def real():
    return _pairs(0, 40)


# ------------------------------------------------------------------------------ visibility
def test_real_pairs_score_about_one_against_other_real_pairs(real):
    """Two independent draws of the same defect process: every ratio ~1."""
    other = _pairs(1, 40)
    m = quality_metrics(other[0], other[1], real[0], real[1])
    for key in ("mask_area_ratio", "visibility_contrast_ratio", "visibility_hf_ratio"):
        assert 0.8 < m[key] < 1.25, (key, m[key])
    assert m["mask_empty_rate"] == 0
    # a set against itself is exactly 1
    same = quality_metrics(real[0], real[1], real[0], real[1])
    for key in ("mask_area_ratio", "visibility_contrast_ratio", "visibility_hf_ratio"):
        assert same[key] == pytest.approx(1.0)


def test_noise_pasted_into_the_mask_has_high_frequency_ratio_above_two(real):
    rng = np.random.default_rng(2)
    images, masks, normals = _pairs(3, 20)
    noisy = []
    for normal, mask in zip(normals, masks):
        img = normal.copy()
        sel = mask > 0
        img[sel] = rng.integers(0, 256, (int(sel.sum()), 1), dtype=np.uint8)  # grey noise, 3 equal channels
        noisy.append(img)
    m = quality_metrics(noisy, masks, real[0], real[1])
    assert m["visibility_hf_ratio"] > 2, m
    assert 0.8 < m["mask_area_ratio"] < 1.25  # the masks themselves are fine


def test_normal_image_under_a_real_mask_has_contrast_ratio_below_half(real):
    """The mask says defect, the pixels say normal surface: the defect is invisible."""
    images, masks, normals = _pairs(4, 20)
    m = quality_metrics(normals, masks, real[0], real[1])
    assert m["visibility_contrast_ratio"] < 0.5, m
    assert quality_metrics(images, masks, real[0], real[1])["visibility_contrast_ratio"] > 0.8  # with the dent


def test_visibility_of_a_known_pair():
    """A flat 100-grey square on a flat 160-grey field: contrast 60; inside the Laplacian is 0
    except on the square's border pixels."""
    img = np.full((SIZE, SIZE, 3), 160, np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[20:40, 20:40] = 3  # any class id > 0 is defect
    img[mask > 0] = 100
    contrast, hf = visibility(img, mask, ring_px=3)
    assert contrast == pytest.approx(60.0)
    border = 4 * 20 - 4  # pixels of the square next to the field
    assert hf == pytest.approx(60.0 * (border + 4) / 400)  # each border pixel sees 1 outside neighbour, corners 2
    # grayscale stored as 3 equal channels reads as its channel; colour uses BT.601 luma
    assert np.array_equal(to_gray(img), img[..., 0].astype(float))
    assert to_gray(np.array([[[255, 0, 0]]], np.uint8))[0, 0] == pytest.approx(0.299 * 255)


def test_empty_masks_and_full_masks():
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    empty = np.zeros((SIZE, SIZE), np.uint8)
    assert all(math.isnan(v) for v in visibility(img, empty))
    full = np.ones((SIZE, SIZE), np.uint8)
    contrast, hf = visibility(img, full)
    assert math.isnan(contrast) and hf == 0.0  # no ring around a whole-image mask
    real_img, real_mask, _ = _real_pair(np.random.default_rng(5))
    m = quality_metrics([img, real_img], [empty, real_mask], [real_img], [real_mask])
    assert m["mask_empty_rate"] == 0.5
    assert m["mask_area_ratio"] == pytest.approx(0.5)  # empty masks count as area 0 in the mean
    assert m["visibility_contrast_ratio"] == pytest.approx(1.0)  # averaged over non-empty masks only
    assert default_ring_px((256, 256)) == 4 and default_ring_px((64, 64)) == 2


def test_mask_area_ratio_sees_masks_twice_too_big():
    small = np.zeros((SIZE, SIZE), np.uint8)
    small[10:20, 10:20] = 1
    big = np.zeros((SIZE, SIZE), np.uint8)
    big[10:30, 10:20] = 1
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    assert mask_area(big) == 2 * mask_area(small)
    assert quality_metrics([img] * 3, [big] * 3, [img] * 2, [small] * 2)["mask_area_ratio"] == pytest.approx(2.0)


def test_bad_shapes_are_rejected():
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match="mask is"):
        visibility(img, np.zeros((SIZE, SIZE + 1), np.uint8))
    with pytest.raises(ValueError, match="H x W x 3"):
        to_gray(np.zeros((SIZE, SIZE, 4), np.uint8))
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        pair_stats([img, img], [np.zeros((SIZE, SIZE), np.uint8)])


# ---------------------------------------------------------------------------- memorisation
def test_copy_of_a_training_image_has_distance_zero(real):
    train = real[0][:5]
    thumbs = thumbnails(train)
    assert np.all(nn_distance(thumbnails(train), thumbs) == 0)
    mirrored = [im[:, ::-1] for im in train]  # generators train with flips: a mirror is a copy too
    assert np.all(nn_distance(thumbnails(mirrored), thumbs) == 0)
    assert np.all(nn_distance(thumbnails(mirrored), thumbs, mirror=False) > 0)
    assert math.isnan(nn_distance(thumbs[:1], thumbs[:0])[0])
    # the distance is the mean absolute grey difference of the thumbnails: +10 everywhere -> 10
    brighter = [np.clip(im.astype(int) + 10, 0, 255).astype(np.uint8) for im in train[:1]]
    assert nn_distance(thumbnails(brighter), thumbs[:1], mirror=False)[0] == pytest.approx(10.0, abs=0.05)


def test_memorisation_ratio_copies_vs_new_images(real):
    images, masks = real[0], real[1]
    train, test = images[:5], images[5:25]
    copies = [train[i % 5] for i in range(20)]
    m_copy = quality_metrics(copies, [masks[i % 5] for i in range(20)], images, masks, train, test)
    assert m_copy["nn_gray_mad_generated"] == 0 and m_copy["memorisation_ratio"] == 0
    assert m_copy["nn_gray_mad_real_test"] > 0
    fresh = _pairs(6, 20)  # new draws of the same process: as far from train as the real test images
    m_new = quality_metrics(fresh[0], fresh[1], images, masks, train, test)
    assert 0.8 < m_new["memorisation_ratio"] < 1.25, m_new
    # without train / test images memorisation is undefined, the other metrics are not
    m_none = quality_metrics(fresh[0], fresh[1], images, masks)
    assert math.isnan(m_none["memorisation_ratio"]) and math.isfinite(m_none["visibility_hf_ratio"])
    m_no_test = quality_metrics(fresh[0], fresh[1], images, masks, train, [])
    assert math.isnan(m_no_test["nn_gray_mad_real_test"]) and math.isnan(m_no_test["memorisation_ratio"])


# ------------------------------------------------------------------------ blocks and levels
def test_per_block_stats_combine_to_the_in_memory_result(real):
    """The evaluation measures pairs block by block where they live; joined, it is the same."""
    images, masks = real[0], real[1]
    train = thumbnails(images[:5])
    gen = _pairs(7, 12)
    parts = [pair_stats(gen[0][i:i + 5], gen[1][i:i + 5], train) for i in range(0, 12, 5)]
    joined = quality_from_stats(concat_stats(parts), pair_stats(images, masks),
                                nn_distance(thumbnails(images[5:]), train))
    direct = quality_metrics(gen[0], gen[1], images, masks, images[:5], images[5:])
    assert joined == pytest.approx(direct, nan_ok=True)


def test_mean_over_types_skips_undefined_values():
    out = mean_over_types([{"a": 1.0, "b": math.nan}, {"a": 3.0, "b": 2.0}, {"a": math.nan}])
    assert out["a"] == 2.0 and out["b"] == 2.0
    assert math.isnan(mean_over_types([{"a": math.nan}])["a"])
