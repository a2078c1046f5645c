"""From a config to training rows and tensors: which data a generator run sees, and in what order.

Why the batch order is a pure function of (seed, rank, step): a run resumed from a checkpoint
then draws exactly the batches the uninterrupted run would have drawn, so "resumed == never
interrupted" holds bit for bit on CPU and is tested.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectforge.config import ConfigBase
from defectforge.errors import DataError
from defectforge.methods.base import GeneratorContext

log = logging.getLogger(__name__)


def resolve_data_root(cfg: ConfigBase) -> Path:
    """``data.path``, or the built-in synthetic dataset under the run root (generated on first use)."""
    if cfg.data.path:
        return Path(cfg.data.path).expanduser().resolve()
    from defectforge.data.synth import write_synthetic

    s = cfg.data.synth
    root = (Path(cfg.tracking.run_root) / "data" / f"synthetic-s{s.seed}-px{s.size}-p{s.products}").resolve()
    if not (root / "README.txt").is_file():
        print(f"[data] writing the built-in synthetic dataset to {root}", flush=True)
        write_synthetic(root, seed=s.seed, size=s.size, products=s.products)
    return root


@dataclass
class TrainingData:
    """Rows a generator trains on, the context it records, and the split they came from."""

    root: Path
    context: GeneratorContext
    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def for_products(self, products: list[str]) -> TrainingData:
        rows = [r for r in self.rows if r["product"] in products]
        ctx = GeneratorContext(tuple(products), {p: self.context.classes[p] for p in products},
                               self.context.resolution, image_channels(rows))
        return TrainingData(self.root, ctx, rows, self.manifest, self.skipped)


def load_training_data(cfg: ConfigBase, products: list[str] | None = None) -> TrainingData:
    """Scan, split (logged manifest) and load the few-shot training rows of ``products``.

    Only the *train* side of the split is loaded: the generator never sees test images.
    Defective images always; defect-free ones too when ``data.train_on_good`` or the method needs
    them (``MethodConfigBase.trains_on_good``: a backbone pretrained here).
    """
    from defectforge.data.mvtec import DataError, load_rows, scan_dataset
    from defectforge.data.splits import make_split

    root = resolve_data_root(cfg)
    wanted = products or cfg.data.products
    index = scan_dataset(root, wanted)
    manifest = make_split(index, cfg.data.split)
    good = cfg.data.train_on_good or cfg.method.trains_on_good()  # a backbone pretrained here needs them
    refs = [r for r in manifest.train if r.defect != "good" or good]
    if not any(r.defect != "good" for r in refs):
        raise DataError(f"{root}: the {cfg.data.split.protocol} split left no defective training images")
    # data.on_bad_sample=error: one error listing every bad sample; skip: leave them out, say which.
    rows, bad = load_rows(index, refs, cfg.data.resolution, cfg.data.on_bad_sample)
    skipped = [(str(path), reason) for path, reason in bad]
    if skipped:
        print(f"[data] skipped {len(skipped)} bad sample(s) (data.on_bad_sample=skip):", flush=True)
        for path, reason in skipped:
            print(f"  {path}: {reason}", flush=True)
    context = GeneratorContext(tuple(index.products), {p: tuple(index.classes[p]) for p in index.products},
                               cfg.data.resolution, image_channels(rows))
    return TrainingData(root, context, rows, manifest.to_json(), skipped)


def image_channels(rows: list[dict[str, Any]]) -> int:
    """1 when every row's image has three equal channels (a grayscale source), else 3."""
    if not rows:
        return 3
    gray = all(np.array_equal(r["image"][..., 0], r["image"][..., 1]) and
               np.array_equal(r["image"][..., 0], r["image"][..., 2]) for r in rows)
    return 1 if gray else 3


def rows_to_tensors(rows: list[dict[str, Any]], context: GeneratorContext) -> dict[str, torch.Tensor]:
    """Stack rows into the protocol's batch layout (see ``Generator.training_step``)."""
    images = np.stack([r["image"] for r in rows]).astype(np.float32)
    defect_ids = [0 if r["defect"] == "good" else context.class_id(r["product"], r["defect"]) for r in rows]
    return {
        "image": torch.from_numpy(images).permute(0, 3, 1, 2).div_(127.5).sub_(1.0).contiguous(),
        "mask": torch.from_numpy(np.stack([r["mask"] for r in rows]).astype(np.int64)),
        "product": torch.tensor([context.products.index(r["product"]) for r in rows], dtype=torch.long),
        "defect": torch.tensor(defect_ids, dtype=torch.long),
    }


class StepBatches:
    """Batch ``step`` of worker ``rank``: indices and flips drawn from ``rng(seed, rank, step)``.

    ``rows`` is the stage's row policy (``Stage.rows``): ``all``, ``defective`` (defect id > 0),
    ``good`` (defect id 0) or ``balanced`` (the first half of each batch defective, the rest good).
    A policy that finds no rows is an error naming it.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int, rank: int,
                 flip: bool = True, rows: str = "all", stage: str = "") -> None:
        self.tensors = tensors
        self.n = len(tensors["image"])
        if self.n == 0:
            raise ValueError("this worker's data shard is empty: fewer training images than workers")
        defective = (tensors["defect"] > 0).numpy()
        pools = {"all": [np.arange(self.n)], "defective": [np.flatnonzero(defective)],
                 "good": [np.flatnonzero(~defective)],
                 "balanced": [np.flatnonzero(defective), np.flatnonzero(~defective)]}[rows]
        if any(len(p) == 0 for p in pools):
            kind = "defect-free" if rows in ("good", "balanced") and not (~defective).any() else "defective"
            raise DataError(f"stage {stage!r} trains on {rows} rows but this worker's training data has no "
                            f"{kind} image" + (" (set data.train_on_good=true to train on defect-free images)"
                                               if kind == "defect-free" else ""))
        self.pools = pools
        self.batch_size = batch_size
        self.seed, self.rank, self.flip = seed, rank, flip

    def _indices(self, rng: np.random.Generator) -> torch.Tensor:
        sizes = [self.batch_size] if len(self.pools) == 1 else [self.batch_size - self.batch_size // 2,
                                                                self.batch_size // 2]
        parts = [pool[rng.choice(len(pool), k, replace=len(pool) < k)] for pool, k in zip(self.pools, sizes)]
        return torch.from_numpy(np.concatenate(parts))

    def __call__(self, step: int, device: torch.device) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        idx = self._indices(rng)
        batch = {k: v[idx] for k, v in self.tensors.items()}
        if self.flip:
            flip = torch.from_numpy(rng.random(self.batch_size) < 0.5)
            batch["image"] = torch.where(flip[:, None, None, None], batch["image"].flip(-1), batch["image"])
            batch["mask"] = torch.where(flip[:, None, None], batch["mask"].flip(-1), batch["mask"])
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
