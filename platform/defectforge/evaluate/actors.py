"""Callable classes for Ray Data's ``map_batches`` / ``map_groups`` (one instance per actor).

Why classes: a generator checkpoint, an Inception network or an LPIPS model is loaded once in
``__init__`` and then serves every batch the actor receives; a plain function would reload it per
batch. Batches are ``dict[str, np.ndarray]`` (``batch_format="numpy"``); images are uint8
N x H x W x 3, masks uint8 N x H x W, the sample contract of DESIGN.md.

Nothing here knows which method or dataset it serves: the generator comes from ``load_generator``,
normal images / masks for methods that need them from ``generate.ConditionSource``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GENERATED, REAL = "generated", "real"


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _get(value: Any) -> Any:
    """Resolve an ``ObjectRef`` passed as a constructor argument (large tables travel by reference)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class EvalActor:
    """One actor of the evaluation's single Ray Data pass: generation (if a checkpoint is given) AND
    features + class logits, with every model loaded once in ``__init__``.

    Why one class and not a generator pool feeding a feature pool: each actor is a fresh process that
    imports torch, torchvision and the metric stack before its first batch (seconds on a small
    machine, measured in the profile of issue 12); two pools paid that twice, a second Ray Data
    execution for the real images a third time. Here every block of the one dataset, conditions
    rows and real or already generated pairs alike, goes through the same actors.

    Batches (``batch_size=None``: one input block = one batch):

    * conditions rows (``product``, ``defect``, ``index``): one generation batch, seeded
      ``seed * 1_000_003 + first index`` as in ``defectforge generate`` (``generate.sample_pairs``),
      so the pairs depend on the seed and the rows, not on which actor ran them; empty masks are
      redrawn. Output: the pairs (``source="generated"``) with their features.
    * pairs (``image``, ``mask``, ...; real references or decoded generated pairs): their features;
      real rows are returned without their pixels, which nothing downstream needs.
    """

    def __init__(self, kind: str, weights_dir: str | None = None, num_gpus: float = 0.0,
                 generator: dict[str, Any] | None = None) -> None:
        from defectforge.evaluate.metrics import make_extractor

        self.extractor = make_extractor(kind, weights_dir, device=_device(num_gpus))
        self.gen = None
        if generator is not None:
            self._load_generator(num_gpus=num_gpus, **generator)

    def _load_generator(self, checkpoint: str, seed: int, num_gpus: float, sampling: dict[str, Any] | None = None,
                        data_root: str | None = None, split: dict[str, Any] | None = None, reject_empty: bool = True,
                        max_attempts: int = 4) -> None:
        from defectforge.config import SplitConfig
        from defectforge.generate import ConditionSource
        from defectforge.methods.base import SamplingOptions, load_generator

        self.gen = load_generator(checkpoint, device=_device(num_gpus))
        # The evaluation's options (a sweep trial's u, sampler, steps), else the checkpoint's own.
        self.options = SamplingOptions.from_json(sampling) if sampling is not None else self.gen.default_sampling
        self.gen.sampling_config(self.options)  # fails here, naming the field, not mid-pass
        self.source = ConditionSource.for_generator(
            self.gen, data_root, SplitConfig.model_validate(split) if split else None, seed=seed)
        self.seed, self.reject_empty, self.max_attempts = seed, reject_empty, max_attempts

    def _generate(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from defectforge.generate import GenerationPlan, sample_pairs

        if self.gen is None:
            raise ValueError("EvalActor got conditions rows but no generator checkpoint")
        index = np.asarray(batch["index"]).astype(np.int64)
        plan = GenerationPlan([str(p) for p in batch["product"]], [str(d) for d in batch["defect"]])
        rows, _ = sample_pairs(self.gen, plan, self.seed * 1_000_003 + int(index[0]), batch_size=len(index),
                               reject_empty=self.reject_empty, max_attempts=self.max_attempts, progress=False,
                               source=self.source, options=self.options)
        return {
            "image": np.stack([r["image"] for r in rows]),
            "mask": np.stack([r["mask"] for r in rows]),
            "product": np.asarray(plan.product),
            "defect": np.asarray(plan.defect),
            "id": np.asarray([f"{i:05d}" for i in index]),
            "split": np.asarray(["synthetic"] * len(rows)),
            "source": np.asarray([GENERATED] * len(rows)),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._generate(batch) if "index" in batch else dict(batch)
        images = np.asarray(out["image"])
        if len(images):
            out["features"] = self.extractor.features(images).astype(np.float64)
            out["logits"] = self.extractor.logits(images).astype(np.float64)
        else:  # a block emptied by an upstream filter
            out["features"] = out["logits"] = np.zeros((0, 0), np.float64)
        if len(images) and str(out["source"][0]) == REAL:  # pixels of real rows are not needed downstream
            out = {k: v for k, v in out.items() if k not in ("image", "mask")}
        return out


def decode_refs(batch: dict[str, np.ndarray], classes: dict[str, list[str]], resolution: int) -> dict[str, np.ndarray]:
    """Rows of file paths -> sample rows; runs as Ray tasks so decoding never happens on the driver."""
    from pathlib import Path

    from defectforge.data.mvtec import load_sample
    from defectforge.data.sample import SampleRef

    rows = []
    for product, defect, sid, image_path, mask_path in zip(batch["product"], batch["defect"], batch["id"],
                                                           batch["image_path"], batch["mask_path"]):
        ref = SampleRef(str(product), str(defect), str(sid), "test", Path(str(image_path)),
                        Path(str(mask_path)) if str(mask_path) else None)
        rows.append(load_sample(ref, tuple(classes[ref.product]), resolution))
    return {
        "image": np.stack([r["image"] for r in rows]), "mask": np.stack([r["mask"] for r in rows]),
        "product": np.asarray([r["product"] for r in rows]), "defect": np.asarray([r["defect"] for r in rows]),
        "id": np.asarray([r["id"] for r in rows]), "split": np.asarray(["synthetic"] * len(rows)),
        "source": np.asarray([GENERATED] * len(rows)),
    }


_LPIPS: dict[tuple[str, str | None, str], Any] = {}


def cached_lpips(kind: str, weights_dir: str | None, device: str) -> Any:
    """The LPIPS model of this worker process, built on first use.

    Why a process-level cache: the diversity runs as one Ray task per (product, defect), and Ray
    runs a caller's queued tasks in the same leased worker; rebuilding LPIPS (and re-reading
    its weights) per task cost ~0.6 s each in the profile of issue 12. The model is read-only here.
    """
    key = (kind, weights_dir, device)
    if key not in _LPIPS:
        from defectforge.evaluate.metrics import build_lpips

        _LPIPS[key] = build_lpips(kind, weights_dir, device=device)
    return _LPIPS[key]


def warm_diversity(kind: str, weights_dir: str | None, num_gpus: float) -> str:
    """Build this worker's LPIPS model (``cached_lpips``) ahead of the diversity tasks.

    Run as a Ray task on a CPU the actor pass leaves idle: the worker imports torch and the metric
    stack while the actors generate, and Ray hands it the diversity tasks that follow.
    """
    return cached_lpips(kind, weights_dir, _device(num_gpus)).name


def diversity_of_group(product: str, defect: str, references: Any, lpips_kind: str, weights_dir: str | None,
                       num_gpus: float, *blocks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Diversity and mask metrics of one (product, defect) group, from the pair blocks (a Ray task)."""
    keep = [(b, np.flatnonzero((np.asarray(b["product"]).astype(str) == product)
                               & (np.asarray(b["defect"]).astype(str) == defect))) for b in blocks]
    batch = {c: np.concatenate([np.asarray(b[c])[i] for b, i in keep if len(i)]) for c in ("image", "mask", "id")}
    batch["product"] = np.asarray([product] * len(batch["id"]))
    batch["defect"] = np.asarray([defect] * len(batch["id"]))
    out = DiversityFn(lpips_kind, weights_dir, references, num_gpus=num_gpus)(batch)
    return {k: (v[0].item() if isinstance(v[0], np.generic) else v[0]) for k, v in out.items()}


class DiversityFn:
    """One (product, defect) group of generated pairs -> one row of diversity and mask metrics.

    Mean pairwise LPIPS among the group's images; IC-LPIPS with the real few-shot *training*
    images of that (product, defect) as cluster centres; mask quality against the real masks of
    that (product, defect). ``references`` maps ``"product/defect"`` to ``{"centres": images,
    "masks": masks}`` (an ObjectRef is resolved once per actor).
    """

    def __init__(self, lpips_kind: str, weights_dir: str | None, references: Any, max_pairs: int | None = 2000,
                 num_gpus: float = 0.0) -> None:
        self.lpips = cached_lpips(lpips_kind, weights_dir, _device(num_gpus))
        self.references = _get(references)
        self.max_pairs = max_pairs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from defectforge.evaluate.metrics import ic_lpips, mask_quality, mean_pairwise_lpips, metric_name

        product, defect = str(batch["product"][0]), str(batch["defect"][0])
        order = np.argsort(np.asarray(batch["id"]).astype(str), kind="stable")  # independent of shuffle order
        images, masks = np.asarray(batch["image"])[order], np.asarray(batch["mask"])[order]
        ref = self.references.get(f"{product}/{defect}", {})
        row: dict[str, Any] = {"product": product, "defect": defect, "n": float(len(images))}
        lp, ic = metric_name("lpips", self.lpips), metric_name("ic_lpips", self.lpips)
        row[lp] = mean_pairwise_lpips(images, self.lpips, max_pairs=self.max_pairs) if len(images) >= 2 else np.nan
        centres = ref.get("centres")
        row[ic] = ic_lpips(images, centres, self.lpips) if centres is not None and len(centres) else np.nan
        real_masks = ref.get("masks")
        if real_masks is not None and len(real_masks):
            row.update(mask_quality(list(masks), list(real_masks)))
        return {k: np.asarray([v]) for k, v in row.items()}
