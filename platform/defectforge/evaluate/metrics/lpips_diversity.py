"""Diversity: mean pairwise LPIPS and IC-LPIPS (intra-cluster LPIPS), with the ``lpips`` package.

Weights, offline. ``lpips.LPIPS(pretrained=True, ...)`` loads its calibrated linear layers from
files inside the package, but its AlexNet/VGG backbone comes from torchvision's download cache
unless ``pnet_rand=True``. So we always build with ``pnet_rand=True`` and then:

* ``kind="standard"``: load torchvision's ImageNet backbone weights (``alexnet-owt-7be5be79.pth``
  or ``vgg16-397923af.pth``) from the local weights directory into LPIPS's backbone slices,
  strictly (every key matched, nothing left over), else ``MissingWeightsError`` naming the file.
  Metrics are named ``lpips`` / ``ic_lpips`` (AlexNet) or ``..._vgg``.
* ``kind="randnet"``: keep the random backbone, drawn under a fixed torch seed. Named
  ``lpips_randnet``; metrics ``ic_lpips_randnet`` etc. Useful only for relative comparisons.

``lpips`` loads its linear weights with ``strict=False``; we check afterwards that every tensor in
the package's file really landed in the model, so a silently skipped key cannot go unnoticed.

IC-LPIPS (Ojha et al., "Few-shot Image Generation via Cross-domain Correspondence", CVPR 2021,
``feat_cluster.py`` of utkarshojha/few-shot-gan-adaptation), the diversity measure AnomalyDiffusion
(Hu et al., AAAI 2024) reports: the real training images are cluster centres; each generated image
joins the centre at the smallest LPIPS distance; within each cluster the mean pairwise LPIPS of its
members (at most ``max_per_cluster`` = 50 of them, a random subset, as in the reference script);
the mean over clusters. A cluster with fewer than 2 members has no pair: the reference script's
mean over an empty list is NaN and it then averages ``avg_dist[~torch.isnan(avg_dist)]``, i.e.
such clusters are skipped; we do the same, and return NaN when no cluster has 2 members. (The
official AnomalyDiffusion repository does not ship its IC-LPIPS script; the behaviour above is that
of the Ojha script and its MVTec adaptation ``ic_lpips(mvtec_path, gen_path, sample_name,
anomaly_name)`` circulated with AnomalyDiffusion-style evaluations.) Ties between centres go to the
lowest index (``np.argmin``); the reference's ``<=`` picks the last, which only differs on exact
ties. The subset draw is seeded here; the reference's ``random.shuffle`` is not.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lpips
import numpy as np
import torch

from defectforge.evaluate.metrics.extractors import MissingWeightsError, check_images, weights_file

#: a batched distance: two uint8 arrays N x H x W x 3 -> N distances (pair i = a[i], b[i])
Distance = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _torchvision_weights(net: str) -> tuple[str, str]:
    """(file name, URL) of the ImageNet weights torchvision uses for LPIPS's backbone."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    url = {"alex": AlexNet_Weights.IMAGENET1K_V1.url, "vgg": VGG16_Weights.IMAGENET1K_V1.url}[net]
    return url.rsplit("/", 1)[-1], url


class LpipsDistance:
    """An ``lpips.LPIPS`` model as a batched distance on uint8 images, with its metric name."""

    def __init__(self, model: torch.nn.Module, name: str, device: str | torch.device = "cpu",
                 batch_size: int = 16) -> None:
        self.model = model.to(device).eval()
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._check_embeddable()

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        # A writable copy: blocks from the object store are read-only.
        x = torch.from_numpy(np.array(images, copy=True)).to(self.device)
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # LPIPS expects [-1, 1]

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        """Each image's LPIPS embedding: an N x D float32 tensor whose squared Euclidean distances
        are the LPIPS distances (``distances``, ``distance_matrix``). Computed once per image however
        many pairs it is in.

        Why this is exact: ``lpips.LPIPS.forward`` (``lpips=True``, ``spatial=False``) is, per layer k
        with H_k x W_k positions, the spatial mean of a 1x1 convolution with weights w_k >= 0 and no
        bias over the squared difference of the unit-normalised feature maps; summed over layers:
        sum_k sum_{c,h,w} (w_kc / H_k W_k) (a_kchw - b_kchw)^2 = |e(a) - e(b)|^2 with
        e(x) = concat_k sqrt(w_k / H_k W_k) * a_k(x). The package's calibrated weights are all >= 0
        (its training clamps them) and its ``lins`` have no bias; ``_check_embeddable`` asserts both
        when the model is built. Channels with w = 0 are left out of e (they add nothing).

        Why: mean pairwise LPIPS over N images is up to N(N-1)/2 pairs; ``lpips.LPIPS(a, b)`` runs
        the backbone on both images of every pair, i.e. ~N^2 forward passes. The embedding needs N
        passes, and a whole distance matrix is one matrix product (issue 12); ``test_metrics``
        checks it against the model's own forward."""
        images = check_images(images, "LPIPS input")
        m = self.model
        out = []
        for s in range(0, len(images), self.batch_size):
            x = self._tensor(images[s:s + self.batch_size])
            feats = m.net.forward(m.scaling_layer(x) if m.version == "0.1" else x)
            parts = []
            for k in range(m.L):
                f = lpips.normalize_tensor(feats[k])[:, self._keep[k]]
                parts.append((f * self._scale[k][:, None, None] / math.sqrt(f.shape[2] * f.shape[3])).flatten(1))
            out.append(torch.cat(parts, 1))
        if not out:
            return torch.zeros(0, 0, device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def distances(self, feats_a: torch.Tensor, i: np.ndarray, feats_b: torch.Tensor, j: np.ndarray,
                  chunk: int = 256) -> np.ndarray:
        """LPIPS between image ``i[n]`` of ``feats_a`` and ``j[n]`` of ``feats_b`` (embeddings from
        ``features``): the squared distance of the two embeddings, pair by pair."""
        a, b = torch.as_tensor(feats_a, device=self.device), torch.as_tensor(feats_b, device=self.device)
        out = []
        for s in range(0, len(i), chunk):
            ii = torch.as_tensor(i[s:s + chunk], device=self.device)
            jj = torch.as_tensor(j[s:s + chunk], device=self.device)
            out.append(((a[ii].double() - b[jj].double()) ** 2).sum(1).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    @torch.no_grad()
    def distance_matrix(self, feats_a: torch.Tensor, feats_b: torch.Tensor) -> np.ndarray:
        """LPIPS between every image of ``feats_a`` and every image of ``feats_b`` (embeddings from
        ``features``): an Na x Nb matrix, |a|^2 + |b|^2 - 2 a.b, one matrix product for all pairs
        (a difference map per pair took 1.3 s for 2 000 pairs of 64 images at 128 px here; issue 12).
        In float64, so the cancellation of the expanded square loses nothing that matters
        (``test_metrics`` compares it with the per-pair path and the model's own forward)."""
        a = torch.as_tensor(feats_a, device=self.device).double()
        b = a if feats_b is feats_a else torch.as_tensor(feats_b, device=self.device).double()
        total = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return total.clamp_min(0.0).cpu().numpy()

    def _check_embeddable(self) -> None:
        """The weights ``features`` folds into the embedding: per layer the 1x1 ``lins`` convolution's
        non-negative weights (their square roots scale the features), no bias. Kept: the channels
        with a positive weight."""
        m = self.model
        self._keep, self._scale = [], []
        for k in range(m.L):
            conv = next(mod for mod in m.lins[k].modules() if isinstance(mod, torch.nn.Conv2d))
            w = conv.weight.detach().reshape(-1)
            if conv.bias is not None or bool((w < 0).any()):
                raise ValueError(f"LPIPS layer {k}: a bias or a negative weight; the embedding of "
                                 "LpipsDistance.features needs non-negative weights and no bias")
            keep = torch.nonzero(w > 0).reshape(-1).to(self.device)
            self._keep.append(keep)
            self._scale.append(w[keep].sqrt().to(self.device))

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = check_images(a, "LPIPS input a"), check_images(b, "LPIPS input b")
        if a.shape != b.shape:
            raise ValueError(f"LPIPS: paired images must have the same shape, got {a.shape} and {b.shape}")
        out = []
        for s in range(0, len(a), self.batch_size):
            d = self.model(self._tensor(a[s:s + self.batch_size]), self._tensor(b[s:s + self.batch_size]))
            out.append(d.reshape(-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)


def _check_linear_weights(model: torch.nn.Module, net: str, version: str) -> None:
    path = Path(lpips.__file__).parent / "weights" / f"v{version}" / f"{net}.pth"
    expected = torch.load(path, map_location="cpu", weights_only=True)
    state = model.state_dict()
    bad = [k for k, v in expected.items() if k not in state or not torch.equal(state[k].cpu(), v)]
    if bad:
        raise RuntimeError(f"LPIPS linear weights from {path} did not load into the model: {bad}")


def _load_backbone(model: torch.nn.Module, path: Path) -> None:
    """Load torchvision ``features.<i>.*`` weights into LPIPS's ``slice<k>.<i>.*`` modules, strictly."""
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"could not read backbone weights {path}: {exc}") from exc
    target = model.net.state_dict()
    mapped, missing = {}, []
    for key in target:
        _slice, rest = key.split(".", 1)  # "slice2.3.weight" -> "3.weight"
        src = f"features.{rest}"
        if src in source:
            mapped[key] = source[src]
        else:
            missing.append(src)
    used = {f"features.{key.split('.', 1)[1]}" for key in target}
    unused = sorted(k for k in source if k.startswith("features.") and k not in used)
    if missing or unused:
        raise RuntimeError(f"backbone weights {path} do not fit LPIPS's network: "
                           f"missing {missing}, unexpected {unused}")
    model.net.load_state_dict(mapped, strict=True)


def build_lpips(kind: str = "standard", weights_dir: str | os.PathLike[str] | None = None,
                device: str | torch.device = "cpu", net: str = "alex", seed: int = 0,
                batch_size: int = 16) -> LpipsDistance:
    """LPIPS distance: ``standard`` (ImageNet backbone from ``weights_dir``) or ``randnet`` (random backbone)."""
    if net not in ("alex", "vgg"):
        raise ValueError(f"LPIPS: unknown backbone {net!r}; known: alex, vgg")
    if kind not in ("standard", "randnet"):
        raise ValueError(f"LPIPS: unknown kind {kind!r}; known: standard, randnet")
    if kind == "standard":  # find the file before building anything
        filename, url = _torchvision_weights(net)
        path = weights_file(filename, weights_dir, f"torchvision's ImageNet {net} weights for LPIPS", url,
                            "set evaluation.feature_extractor=randfeat to use lpips_randnet")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # the random backbone (randnet) is the same in every process
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _check_linear_weights(model, net, model.version)
    if kind == "standard":
        _load_backbone(model, path)
        name = "lpips" if net == "alex" else f"lpips_{net}"
    else:
        name = "lpips_randnet" if net == "alex" else f"lpips_randnet_{net}"
    return LpipsDistance(model, name, device=device, batch_size=batch_size)


def as_distance(model: Any) -> Distance:
    """Accept an ``LpipsDistance``, a bare ``lpips.LPIPS`` module, or any batched distance callable."""
    if isinstance(model, torch.nn.Module):
        return LpipsDistance(model, name=getattr(model, "name", "lpips_module"))
    if callable(model):
        return model
    raise TypeError(f"expected an LPIPS model or a distance callable, got {type(model).__name__}")


def mean_pairwise_lpips(images: Any, model: Any, max_pairs: int | None = None, seed: int = 0,
                        chunk: int = 256) -> float:
    """Mean distance over all unordered pairs of ``images`` (or a seeded sample of ``max_pairs``)."""
    arr = check_images(images)
    if len(arr) < 2:
        raise ValueError(f"mean pairwise LPIPS needs at least 2 images, got {len(arr)}")
    dist = as_distance(model)
    i, j = np.triu_indices(len(arr), k=1)
    if max_pairs is not None and len(i) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False))
        i, j = i[keep], j[keep]
    if isinstance(dist, LpipsDistance):  # one backbone pass per image, one matrix product for all pairs
        feats = dist.features(arr)
        return float(np.sum(dist.distance_matrix(feats, feats)[i, j])) / len(i)
    total = 0.0
    for s in range(0, len(i), chunk):
        total += float(np.sum(dist(arr[i[s:s + chunk]], arr[j[s:s + chunk]])))
    return total / len(i)


def assign_clusters(generated: Any, centres: Any, model: Any) -> np.ndarray:
    """Index of the nearest centre (smallest distance) for each generated image."""
    gen, cen = check_images(generated, "generated images"), check_images(centres, "cluster centres")
    if gen.shape[1:] != cen.shape[1:]:
        raise ValueError(f"generated images {gen.shape[1:]} and centres {cen.shape[1:]} differ in size")
    dist = as_distance(model)
    if isinstance(dist, LpipsDistance):  # N + K backbone passes instead of 2 N K
        fg, fc = dist.features(gen), dist.features(cen)
        d = dist.distance_matrix(fg, fc)
    else:
        d = np.stack([dist(gen, np.broadcast_to(c, gen.shape)) for c in cen], axis=1)  # N x K
    return np.argmin(d, axis=1)


def ic_lpips(generated: Any, centres: Any, model: Any, max_per_cluster: int | None = 50,
             seed: int = 0) -> float:
    """IC-LPIPS: mean over clusters (>= 2 members) of the mean pairwise distance within each cluster."""
    gen = check_images(generated, "generated images")
    values = [mean_pairwise_lpips(gen[members], model)
              for members in cluster_members(assign_clusters(gen, centres, model), max_per_cluster, seed)]
    return float(np.mean(values)) if values else float("nan")


def cluster_members(labels: np.ndarray, max_per_cluster: int | None, seed: int) -> list[np.ndarray]:
    """IC-LPIPS's clusters: the members of each cluster with >= 2 of them, at most
    ``max_per_cluster`` (a seeded subsample, drawn cluster by cluster in label order)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        if max_per_cluster is not None and len(members) > max_per_cluster:
            members = np.sort(rng.choice(members, size=max_per_cluster, replace=False))
        if len(members) >= 2:
            out.append(members)
    return out


def diversity_lpips(images: Any, centres: Any, model: Any, max_pairs: int | None = None, seed: int = 0,
                    max_per_cluster: int | None = 50) -> tuple[float, float]:
    """``(mean_pairwise_lpips(images, ...), ic_lpips(images, centres, ...))`` with each image's
    backbone features computed once (issue 12: the two calls ran the backbone over the same images
    three times per group). Same pairs, same seeded subsamples, same numbers as the two functions
    (``test_metrics`` checks it). ``centres`` may be None or empty: IC-LPIPS is then NaN."""
    arr = check_images(images)
    has_centres = centres is not None and len(centres) > 0
    dist = as_distance(model)
    if not isinstance(dist, LpipsDistance):  # any other distance: the two functions as they are
        return (mean_pairwise_lpips(arr, dist, max_pairs=max_pairs, seed=seed) if len(arr) >= 2 else float("nan"),
                ic_lpips(arr, centres, dist, max_per_cluster, seed) if has_centres else float("nan"))
    return diversity_from_features(dist, dist.features(arr), dist.features(check_images(centres, "cluster centres"))
                                   if has_centres else None, max_pairs, seed, max_per_cluster)


def diversity_from_features(dist: LpipsDistance, feats: torch.Tensor, centre_feats: torch.Tensor | None,
                            max_pairs: int | None = None, seed: int = 0,
                            max_per_cluster: int | None = 50) -> tuple[float, float]:
    """``diversity_lpips`` from ``dist.features`` of the images (in their order) and of the centres.

    Why separate: the features are the cost; a caller that has them (``actors.diversity_row``)
    passes them in rather than recomputing. (Computing them in the driver block by block while the
    pass still ran was tried for issue 12 and slowed the pass 3x here: the driver's torch calls hold
    the GIL that Ray Data's executor thread in the same process needs.)"""
    feats = torch.as_tensor(feats).double()  # once here, not in each distance_matrix call below
    n = len(feats)
    d_gg = dist.distance_matrix(feats, feats)
    mean_pairwise = float("nan")
    if n >= 2:
        i, j = np.triu_indices(n, k=1)
        if max_pairs is not None and len(i) > max_pairs:
            keep = np.sort(np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False))
            i, j = i[keep], j[keep]
        mean_pairwise = float(np.sum(d_gg[i, j])) / len(i)
    if centre_feats is None or len(centre_feats) == 0:
        return mean_pairwise, float("nan")
    if feats.shape[1:] != centre_feats.shape[1:]:
        raise ValueError(f"generated images and centres differ in size (LPIPS embeddings of {feats.shape[1]} vs "
                         f"{centre_feats.shape[1]} values)")
    labels = np.argmin(dist.distance_matrix(feats, centre_feats), axis=1)
    values = []
    for members in cluster_members(labels, max_per_cluster, seed):
        a, b = np.triu_indices(len(members), k=1)
        values.append(float(np.mean(d_gg[members[a], members[b]])))
    return mean_pairwise, float(np.mean(values)) if values else float("nan")


__all__ = ["Distance", "LpipsDistance", "MissingWeightsError", "as_distance", "assign_clusters", "build_lpips",
           "diversity_from_features", "diversity_lpips",
           "ic_lpips", "mean_pairwise_lpips"]
