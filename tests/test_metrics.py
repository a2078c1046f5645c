"""Metric library against hand computations (tiny arrays and images: the whole file runs in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance
from cleanfid.resize import build_resizer

from defectforge.evaluate.metrics import (
    GaussianStats,
    InceptionExtractor,
    MissingWeightsError,
    RandFeatExtractor,
    assign_clusters,
    build_lpips,
    fid_from_features,
    fid_from_stats,
    ic_lpips,
    inception_score,
    inception_score_from_logits,
    kid,
    make_extractor,
    mask_quality,
    mean_pairwise_lpips,
    metric_name,
)
from defectforge.evaluate.metrics.extractors import INCEPTION_FILE, WEIGHTS_ENV


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _const_images(values, size: int = 8) -> np.ndarray:
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in values])


# ------------------------------------------------------------------------------------------ FID
def test_fid_zero_against_itself_and_grows_with_shift():
    x = np.random.default_rng(0).normal(size=(400, 8))
    assert abs(fid_from_features(x, x)) < 1e-6
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    values = [fid_from_features(x, x + s) for s in shifts]
    # same covariance, mean moved by s in each of 8 dims: FID = ||s * 1||^2 = 8 s^2
    np.testing.assert_allclose(values, [8 * s * s for s in shifts], atol=1e-6)
    assert all(a < b for a, b in zip(values, values[1:]))


def test_streaming_stats_match_in_memory_computation():
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(16, 16))
    x = rng.normal(size=(300, 16)) @ mix + 3.0  # correlated, offset features
    y = rng.normal(size=(250, 16)) @ mix * 0.8 - 1.0

    chunked = GaussianStats()
    start = 0
    for size in (7, 100, 50, 143):
        chunked.update(x[start:start + size])
        start += size
    assert chunked.count == 300
    merged = GaussianStats().update(x[:120]).merge(GaussianStats().update(x[120:]))
    y_stats = GaussianStats.from_dict(GaussianStats.of(y).to_dict())  # through serialisation

    expected = frechet_distance(np.mean(x, 0), np.cov(x, rowvar=False), np.mean(y, 0), np.cov(y, rowvar=False))
    for stats in (chunked, merged):
        np.testing.assert_allclose(stats.mean, np.mean(x, 0), rtol=1e-10)
        np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
        assert fid_from_stats(stats, y_stats) == pytest.approx(expected, rel=1e-6)
    assert GaussianStats().merge(merged).count == 300  # an empty partial aggregate is neutral


@pytest.mark.parametrize(("n", "dim"), [(40, 16), (12, 32)])
def test_rank_deficient_fid_is_clean_fids_value_without_the_singular_matrix_warning(n, dim):
    """A constant feature (the stand-in's never-active units), with more rows than dimensions or
    fewer: clean-fid alone warns "Matrix is singular"; ours gives its value without the warning,
    and the filter does not outlive the call."""
    import warnings

    from scipy.linalg import LinAlgWarning

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(n, dim)), rng.normal(size=(n - 2, dim)) + 0.5
    x[:, :2], y[:, :2] = 0.0, 1.0
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        expected = frechet_distance(np.mean(x, 0), np.cov(x, rowvar=False), np.mean(y, 0), np.cov(y, rowvar=False))
    assert any(issubclass(w.category, LinAlgWarning) for w in raw)  # what clean-fid alone does here
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = fid_from_features(x, y)
        warnings.warn("still on", LinAlgWarning, stacklevel=1)
    assert got == pytest.approx(expected, rel=1e-6)  # our covariance is formed from sums (module doc)
    assert [str(w.message) for w in ours if issubclass(w.category, LinAlgWarning)] == ["still on"]


def test_rank_deficiency_is_told_from_a_full_rank_set():
    from defectforge.evaluate.metrics.fid import _rank_deficient

    rng = np.random.default_rng(4)
    full = rng.normal(size=(40, 16))
    assert not _rank_deficient(GaussianStats.of(full))
    assert _rank_deficient(GaussianStats.of(full[:16]))  # rows <= dimensions
    full[:, 5] = 7.0
    assert _rank_deficient(GaussianStats.of(full))  # a constant feature


def test_gaussian_stats_rejects_bad_input():
    stats = GaussianStats().update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dimension 5"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_stats(GaussianStats().update(np.zeros((1, 4))), stats)


# ------------------------------------------------------------------------------------------ KID
def _mmd2_unbiased_cubic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out term by term."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_matches_direct_unbiased_mmd_for_equal_sizes():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.5
    assert kid(a, b) == pytest.approx(_mmd2_unbiased_cubic(a, b), rel=1e-9)
    same = rng.normal(size=(40, 6))  # a second sample of a's distribution: KID near 0, below the shifted set's
    assert abs(kid(a, same)) < kid(a, b)


def test_kid_subsampling_is_seeded_and_leaves_global_rng_alone():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 6)), rng.normal(size=(25, 6)) + 0.3
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    v1 = kid(a, b, num_subsets=20, seed=0)
    assert np.random.random() == before  # caller's stream is untouched
    assert kid(a, b, num_subsets=20, seed=0) == v1
    assert kid(a, b, num_subsets=20, seed=1) != v1  # the larger set really is sub-sampled


# ------------------------------------------------------------------------------------------- IS
def test_inception_score_hand_values():
    uniform = np.full((12, 5), 0.2)
    assert inception_score(uniform, splits=1).mean == pytest.approx(1.0)
    assert inception_score_from_logits(np.zeros((12, 5)), splits=3).mean == pytest.approx(1.0)
    onehot = np.eye(10)
    assert inception_score(onehot, splits=1).mean == pytest.approx(10.0)
    res = inception_score(onehot, splits=2)  # two splits of 5 distinct classes each
    assert res.mean == pytest.approx(5.0) and res.std == pytest.approx(0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.ones((4, 3)))


# ---------------------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def lpips_randnet():
    return build_lpips("randnet")


def test_lpips_zero_for_identical_positive_for_different(lpips_randnet):
    imgs = _images(3, size=32)
    assert lpips_randnet.name == "lpips_randnet"
    np.testing.assert_allclose(lpips_randnet(imgs, imgs), 0.0, atol=1e-7)
    assert (lpips_randnet(imgs, imgs[::-1].copy())[[0, 2]] > 0).all()
    assert mean_pairwise_lpips(np.repeat(imgs[:1], 3, axis=0), lpips_randnet) == pytest.approx(0.0, abs=1e-7)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = np.mean([lpips_randnet(imgs[[i]], imgs[[j]])[0] for i, j in pairs])
    assert mean_pairwise_lpips(imgs, lpips_randnet) == pytest.approx(expected, rel=1e-5)
    assert mean_pairwise_lpips(imgs, lpips_randnet) > 0


def test_lpips_from_cached_features_equals_the_models_forward(lpips_randnet):
    """Pairwise LPIPS from once-per-image features (what mean pairwise LPIPS and IC-LPIPS use) is
    ``lpips.LPIPS(a, b)`` itself, pair by pair, at the evaluation's 64 px."""
    imgs = _images(7, size=64, seed=11)
    i, j = np.triu_indices(len(imgs), k=1)
    feats = lpips_randnet.features(imgs)
    cached = lpips_randnet.distances(feats, i, feats, j, chunk=5)
    direct = lpips_randnet(imgs[i], imgs[j])
    np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-7)
    matrix = lpips_randnet.distance_matrix(feats, feats)  # the expanded square, all pairs at once
    np.testing.assert_allclose(matrix[i, j], direct, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.diag(matrix), 0.0, atol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, rtol=1e-9, atol=1e-12)
    centres = _images(3, size=64, seed=12)
    brute = np.argmin(np.stack([lpips_randnet(imgs, np.broadcast_to(c, imgs.shape).copy()) for c in centres], 1), 1)
    np.testing.assert_array_equal(assign_clusters(imgs, centres, lpips_randnet), brute)


def test_lpips_embedding_needs_the_packages_non_negative_weights(lpips_randnet):
    """The embedding of ``LpipsDistance.features`` is exact only for non-negative 1x1 weights
    without bias (what the package ships); a model with a negative weight or a bias is refused, not
    embedded wrongly, and zero-weight channels are left out of the embedding."""
    import copy

    import torch

    from defectforge.evaluate.metrics.lpips_diversity import LpipsDistance

    model = copy.deepcopy(lpips_randnet.model)
    conv = next(m for m in model.lins[0].modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = -0.1
    with pytest.raises(ValueError, match="negative weight"):
        LpipsDistance(model, "bad")
    model = copy.deepcopy(lpips_randnet.model)
    conv = next(m for m in model.lins[1].modules() if isinstance(m, torch.nn.Conv2d))
    conv.bias = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="a bias"):
        LpipsDistance(model, "bad")
    # 5 layers at 64 px: 15x15, 7x7, 3x3, 3x3, 3x3 positions times the channels with w > 0
    keep = [int((next(m for m in lpips_randnet.model.lins[k].modules()
                      if isinstance(m, torch.nn.Conv2d)).weight > 0).sum()) for k in range(5)]
    assert lpips_randnet.features(_images(1, size=64)).shape[1] == sum(
        n * hw for n, hw in zip(keep, (225, 49, 9, 9, 9)))


def test_lpips_randnet_is_deterministic(lpips_randnet):
    imgs = _images(2, size=32, seed=5)
    again = build_lpips("randnet")
    np.testing.assert_array_equal(again(imgs[:1], imgs[1:]), lpips_randnet(imgs[:1], imgs[1:]))


def test_lpips_standard_needs_local_backbone_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth") as err:
        build_lpips("standard", weights_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(MissingWeightsError, match=WEIGHTS_ENV):
        build_lpips("standard", weights_dir=None)


def test_lpips_standard_loads_backbone_strictly(tmp_path):
    import torchvision

    torch.manual_seed(7)
    features = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
                if k.startswith("features.")}  # the classifier is not used by LPIPS
    torch.save(features, tmp_path / "alexnet-owt-7be5be79.pth")
    dist = build_lpips("standard", weights_dir=tmp_path)
    assert dist.name == "lpips" and metric_name("ic_lpips", dist) == "ic_lpips"
    torch.testing.assert_close(dist.model.net.slice1.get_submodule("0").weight, features["features.0.weight"])
    torch.testing.assert_close(dist.model.net.slice5.get_submodule("10").bias, features["features.10.bias"])

    del features["features.3.weight"]
    torch.save(features, tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(RuntimeError, match="features.3.weight") as err:
        build_lpips("standard", weights_dir=tmp_path)
    assert "alexnet-owt-7be5be79.pth" in str(err.value)


def _mean_abs_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A stand-in distance: |mean(a) - mean(b)| per pair (images here are constant)."""
    return np.abs(a.reshape(len(a), -1).mean(1) - b.reshape(len(b), -1).mean(1))


def test_ic_lpips_follows_cluster_protocol():
    centres = _const_images([0, 100, 200])
    generated = _const_images([10, 20, 40, 90, 130, 190])
    labels = assign_clusters(generated, centres, _mean_abs_distance)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2])
    # cluster 0: |10-20|, |10-40|, |20-40| -> mean 20; cluster 1: |90-130| = 40;
    # cluster 2 has one member: no pair, skipped. IC-LPIPS = (20 + 40) / 2 = 30.
    assert ic_lpips(generated, centres, _mean_abs_distance) == pytest.approx(30.0)
    # capped at 2 members per cluster: cluster 0 keeps one of its three pairs
    capped = ic_lpips(generated, centres, _mean_abs_distance, max_per_cluster=2, seed=0)
    assert any(capped == pytest.approx((v + 40) / 2) for v in (10.0, 20.0, 30.0))
    assert ic_lpips(generated, centres, _mean_abs_distance, max_per_cluster=2, seed=0) == capped  # seeded
    assert np.isnan(ic_lpips(_const_images([5, 95]), centres, _mean_abs_distance))


def test_ic_lpips_with_lpips_model(lpips_randnet):
    centres = _images(2, size=32, seed=8)
    generated = np.concatenate([centres, centres])  # each centre's copies join its own cluster
    np.testing.assert_array_equal(assign_clusters(generated, centres, lpips_randnet), [0, 1, 0, 1])
    assert ic_lpips(generated, centres, lpips_randnet) == pytest.approx(0.0, abs=1e-7)


def test_diversity_lpips_equals_the_two_metrics(lpips_randnet):
    """One feature pass per image gives the numbers of ``mean_pairwise_lpips`` and ``ic_lpips``,
    with their seeded subsamples (pairs capped at 20, clusters at 3 members) taking effect."""
    from defectforge.evaluate.metrics import diversity_lpips

    images, centres = _images(12, size=32, seed=21), _images(2, size=32, seed=22)
    pair, ic = diversity_lpips(images, centres, lpips_randnet, max_pairs=20, seed=3, max_per_cluster=3)
    assert pair == pytest.approx(mean_pairwise_lpips(images, lpips_randnet, max_pairs=20, seed=3), rel=1e-6)
    assert ic == pytest.approx(ic_lpips(images, centres, lpips_randnet, max_per_cluster=3, seed=3), rel=1e-6)
    assert pair != pytest.approx(mean_pairwise_lpips(images, lpips_randnet), rel=1e-6)  # the cap was applied
    no_centres = diversity_lpips(images, None, lpips_randnet)
    assert no_centres[0] == pytest.approx(mean_pairwise_lpips(images, lpips_randnet), rel=1e-6)
    assert np.isnan(no_centres[1]) and np.isnan(diversity_lpips(images[:1], centres, lpips_randnet)[0])
    # any other distance callable: the two functions themselves
    consts = _const_images([10, 20, 40, 90, 130, 190])
    assert diversity_lpips(consts, _const_images([0, 100, 200]), _mean_abs_distance)[1] == pytest.approx(30.0)


# ----------------------------------------------------------------------------------- extractors
def test_standard_extractor_absent_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError) as err:
        make_extractor("standard", weights_dir=tmp_path)
    msg = str(err.value)
    assert INCEPTION_FILE in msg and str(tmp_path) in msg and "feature_extractor=randfeat" in msg
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "staged"))
    with pytest.raises(MissingWeightsError, match="staged"):
        make_extractor("standard")
    with pytest.raises(ValueError, match="evaluation.feature_extractor"):
        make_extractor("vgg")


class _FakeInceptionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)))[:, :, None, None]


class _FakeInception(torch.nn.Module):
    """Same interface as the Inception TorchScript clean-fid uses: ``layers`` + ``forward(img, ...)``."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()
        self.output = torch.nn.Linear(2048, 7)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        f = self.layers((img - 128) / 128).reshape(-1, 2048)
        if return_features:
            return f
        logits = f @ self.output.weight.T
        if not no_output_bias:
            logits = logits + self.output.bias
        return torch.softmax(logits, dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_standard_extractor_loads_local_torchscript_through_clean_fid(tmp_path):
    torch.manual_seed(0)
    fake = _FakeInception().eval()
    torch.jit.script(fake).save(str(tmp_path / INCEPTION_FILE))
    ext = make_extractor("standard", weights_dir=tmp_path)
    assert isinstance(ext, InceptionExtractor) and metric_name("fid", ext) == "fid"
    imgs = _images(2, size=40)
    feats = ext.features(imgs)
    # by hand: clean-fid's "clean" resize to 299, then the network's [-1, 1] normalisation
    resized = np.stack([build_resizer("clean")(im) for im in imgs]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = fake.layers((torch.from_numpy(resized.copy()) - 128) / 128).reshape(-1, 2048).numpy()
    assert feats.shape == (2, 2048)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
    probs = torch.softmax(torch.from_numpy(ext.logits(imgs)), dim=1).numpy()
    with torch.no_grad():
        expected_probs = fake(torch.from_numpy(resized.copy()), no_output_bias=True).numpy()
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-4, atol=1e-6)


def test_randfeat_is_deterministic_and_named():
    imgs = _images(5, size=48)
    a, b = RandFeatExtractor(), make_extractor("randfeat")
    fa = a.features(imgs)
    assert fa.shape == (5, 256) and a.logits(imgs).shape == (5, 100)
    np.testing.assert_array_equal(fa, b.features(imgs))
    np.testing.assert_allclose(a.features(imgs[:2]), fa[:2], rtol=1e-5, atol=1e-6)  # batch-independent
    assert not np.allclose(RandFeatExtractor(seed=1).features(imgs), fa)
    with pytest.raises(ValueError, match="uint8"):
        a.features(imgs.astype(np.float32))


def test_randfeat_takes_read_only_batches_silently():
    """Ray Data hands actors read-only arrays: same features as a writable copy, and no warning."""
    import warnings

    imgs = _images(3, size=48)
    frozen = imgs.copy()
    frozen.flags.writeable = False
    extractor = RandFeatExtractor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(extractor.features(frozen), extractor.features(imgs))


def test_metric_names():
    assert metric_name("fid", "inception") == "fid"
    assert metric_name("fid", RandFeatExtractor()) == "fid_randfeat"
    assert metric_name("kid", "randfeat") == "kid_randfeat"
    assert metric_name("is", "randfeat") == "is_randfeat"
    assert metric_name("is", "inception") == "is"
    assert metric_name("ic_lpips", "lpips_randnet") == "ic_lpips_randnet"


# ---------------------------------------------------------------------------------------- masks
def _mask(blobs, size: int = 10) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    for r0, r1, c0, c1 in blobs:
        m[r0:r1, c0:c1] = 1
    return m


def test_mask_quality_hand_values():
    generated = [
        _mask([]),                                   # area 0, 0 components
        _mask([(0, 1, 0, 10)]),                      # area 0.1, 1 component
        _mask([(0, 1, 0, 10), (5, 7, 0, 10)]),       # area 0.3, 2 components
    ]
    real = [
        _mask([(0, 1, 0, 10)]),                      # 0.1, 1
        _mask([(0, 2, 0, 5), (5, 7, 5, 10)]),        # 0.2, 2
        _mask([(3, 5, 0, 10)]),                      # 0.2, 1
    ]
    q = mask_quality(generated, real)
    # W1 of equal-size samples = mean |sorted(g) - sorted(r)| = (0.1 + 0.1 + 0.1) / 3
    assert q["mask_area_w1"] == pytest.approx(0.1)
    assert q["mask_empty_rate"] == pytest.approx(1 / 3) and q["mask_empty_rate_real"] == 0.0
    assert q["mask_components_mean"] == pytest.approx(1.0)
    assert q["mask_components_mean_real"] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match=r"generated masks\[1\]"):
        mask_quality([_mask([]), np.zeros(5)], real)


def test_every_lazy_metric_name_is_the_object_its_module_defines():
    """``evaluate.metrics`` resolves names lazily; a submodule named like a function it exports
    would shadow it once imported (``kid`` the module instead of ``kid`` the function)."""
    import importlib

    import defectforge.evaluate.metrics as metrics

    for name, module in metrics._WHERE.items():
        importlib.import_module(module)  # binds the submodule on the package, as any import would
        assert getattr(metrics, name) is getattr(importlib.import_module(module), name), name
        assert not callable(getattr(metrics, name)) or not isinstance(getattr(metrics, name), type(metrics)), name
    assert sorted(metrics._WHERE) == sorted(metrics.__all__)
