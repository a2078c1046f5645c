"""Feature extractors for FID/KID/IS, local weights, and metric naming.

Why this module exists: clean-fid's ``build_feature_extractor(mode, device, use_dataparallel)``
downloads the Inception TorchScript into /tmp on first use. Nothing may download at run time here
(and clusters pre-stage weights), so the standard extractor loads the same file,
``inception-2015-12-05.pt``, from a local weights directory (``evaluation.weights_dir`` or env
``DEFECTFORGE_WEIGHTS``) through clean-fid's own wrapper ``InceptionV3W(path, download=False)``,
and preprocesses with clean-fid's own "clean" resizer (PIL bicubic to 299x299 per channel in
float, ``cleanfid.resize.build_resizer("clean")``). A missing file is a ``MissingWeightsError``
saying which file to put where.

The stand-in ``randfeat`` is a fixed-seed random conv net: it needs no weights, so CPU tests and
laptops can still compare *relative* fidelity between runs. Its numbers are not Inception numbers
and are always logged under names that say so (``fid_randfeat``, see ``metric_name``).
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS_ENV = "DEFECTFORGE_WEIGHTS"
INCEPTION_FILE = "inception-2015-12-05.pt"
#: names of measuring objects whose metrics carry the bare standard name (``fid``, ``ic_lpips``)
STANDARD_NAMES = frozenset({"inception", "lpips"})


from defectforge.errors import MissingWeightsError  # noqa: E402  (re-exported here)


def resolve_weights_dir(weights_dir: str | os.PathLike[str] | None) -> Path | None:
    """The weights directory: the explicit argument (config), else env ``DEFECTFORGE_WEIGHTS``."""
    chosen = weights_dir if weights_dir not in (None, "") else os.environ.get(WEIGHTS_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


def weights_file(
    filename: str, weights_dir: str | os.PathLike[str] | None, what: str, source: str, alternative: str
) -> Path:
    """Path of ``filename`` in the weights directory, or a ``MissingWeightsError`` saying what to put where."""
    directory = resolve_weights_dir(weights_dir)
    hint = f"put {filename} ({what}, from {source}) into "
    if directory is None:
        raise MissingWeightsError(
            f"no weights directory configured: {hint}a directory and set evaluation.weights_dir "
            f"(or env {WEIGHTS_ENV}) to it, or {alternative}"
        )
    path = directory / filename
    if not path.is_file():
        raise MissingWeightsError(f"{path} not found: {hint}{directory} or {alternative}")
    return path


def metric_name(base: str, extractor: Any) -> str:
    """``base`` for the standard networks (``fid``, ``kid``, ``is``, ``ic_lpips``), else suffixed.

    ``extractor`` is a feature extractor or LPIPS distance (anything with ``.name``) or that name
    itself: ``metric_name("fid", "inception") == "fid"``, ``metric_name("fid", "randfeat") ==
    "fid_randfeat"``, ``metric_name("ic_lpips", "lpips_randnet") == "ic_lpips_randnet"``.
    """
    name = extractor if isinstance(extractor, str) else getattr(extractor, "name", None)
    if not name:
        raise ValueError(f"metric_name: cannot tell which network computed {base!r} (got {extractor!r})")
    if name in STANDARD_NAMES:
        return base
    suffix = name[len("lpips_"):] if name.startswith("lpips_") else name
    return f"{base}_{suffix}"


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """``images`` as a uint8 N x H x W x 3 array, or a ValueError naming what is wrong."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty N x H x W x 3 array, got shape {arr.shape}")
    return arr


class FeatureExtractor(ABC):
    """Maps uint8 images (N x H x W x 3) to feature rows (N x D), and optionally to class logits."""

    name: str
    dim: int
    has_logits: bool = False

    @abstractmethod
    def features(self, images: Any) -> np.ndarray:
        """Feature rows, float64 N x D."""

    def logits(self, images: Any) -> np.ndarray:
        """Class logits N x C (for the Inception Score); only when ``has_logits``."""
        raise NotImplementedError(f"feature extractor {self.name!r} has no class logits")


class InceptionExtractor(FeatureExtractor):
    """clean-fid's Inception-v3 TorchScript (2048-d pool features; 1008-way softmax for IS)."""

    name = "inception"
    dim = 2048
    has_logits = True

    def __init__(self, weights_dir: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32) -> None:
        from cleanfid.downloads_helper import inception_url
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = weights_file(INCEPTION_FILE, weights_dir, "clean-fid's Inception TorchScript", inception_url,
                            "set evaluation.feature_extractor=randfeat")
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # the file *is* TorchScript; torch's deprecation note is noise here
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
                self.model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(self.device).eval()
        except Exception as exc:  # a truncated or foreign file: say which one
            raise RuntimeError(f"could not load the Inception TorchScript {path}: {exc}") from exc
        self.resize = build_resizer("clean")
        self.batch_size = batch_size

    def _batches(self, images: Any):
        arr = check_images(images)
        for start in range(0, len(arr), self.batch_size):
            chunk = np.stack([self.resize(img) for img in arr[start:start + self.batch_size]])
            yield torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))).to(self.device)

    @torch.no_grad()
    def features(self, images: Any) -> np.ndarray:
        return np.concatenate([self.model(x).cpu().numpy() for x in self._batches(images)]).astype(np.float64)

    @torch.no_grad()
    def logits(self, images: Any) -> np.ndarray:
        # The TorchScript's forward returns softmax probabilities; ``no_output_bias=True`` matches
        # the original TF Inception Score (as StyleGAN2-ADA's IS does). Its internal resize is the
        # identity on our already-299 px input. log(p) are logits whose softmax is p.
        probs = [self.model.base(x, no_output_bias=True).cpu().numpy() for x in self._batches(images)]
        return np.log(np.clip(np.concatenate(probs).astype(np.float64), 1e-30, None))


class RandFeatExtractor(FeatureExtractor):
    """Stand-in: a random conv net, fixed by ``seed``, giving ``dim`` features and pseudo-logits.

    Weights are drawn from an explicit ``torch.Generator`` (He-normal), not from torch's default
    layer initialisers, so the same seed gives the same network in every process and version.
    Images are resized to ``size`` (bilinear, antialiased) so sets of different resolutions are
    compared in one feature space.
    """

    name = "randfeat"
    has_logits = True

    def __init__(self, seed: int = 0, dim: int = 256, num_classes: int = 100, size: int = 64,
                 device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.device = torch.device(device)
        self.dim, self.size, self.batch_size = dim, size, batch_size
        g = torch.Generator().manual_seed(seed)
        widths = [3, 32, 64, 128, dim]
        self.convs = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            w = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (cin * 9)) ** 0.5
            b = torch.randn(cout, generator=g) * 0.1
            self.convs.append((w.to(self.device), b.to(self.device)))
        self.head = (torch.randn(num_classes, dim, generator=g) * (1.0 / dim) ** 0.5).to(self.device)

    @torch.no_grad()
    def _features_t(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        for w, b in self.convs:
            x = F.relu(F.conv2d(x, w, b, stride=2, padding=1))
        return x.mean(dim=(2, 3))

    def _run(self, images: Any, logits: bool) -> np.ndarray:
        arr = check_images(images)
        out = []
        for start in range(0, len(arr), self.batch_size):
            # A copy (torch.tensor), not a view: Ray Data hands over read-only arrays, which
            # torch.from_numpy accepts only with a UserWarning in every evaluation's log.
            x = torch.tensor(arr[start:start + self.batch_size], device=self.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            f = self._features_t(x)
            out.append((f @ self.head.T if logits else f).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def features(self, images: Any) -> np.ndarray:
        return self._run(images, logits=False)

    def logits(self, images: Any) -> np.ndarray:
        return self._run(images, logits=True)


def make_extractor(kind: str, weights_dir: str | os.PathLike[str] | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    """``evaluation.feature_extractor``: ``standard`` (Inception, local weights) or ``randfeat``."""
    if kind == "standard":
        return InceptionExtractor(weights_dir, device)
    if kind == "randfeat":
        return RandFeatExtractor(device=device)
    raise ValueError(f"evaluation.feature_extractor: unknown extractor {kind!r}; known: standard, randfeat")
