"""Generate image + mask pairs from a checkpoint and write them as a dataset (any method).

Output layout (readable by ``defectforge data check`` and by every reader here)::

    <out>/<product>/test/<defect>/<id>.png
    <out>/<product>/ground_truth/<defect>/<id>_mask.png   0/255 when the mask holds only the
                                                          folder's defect, class ids otherwise
    <out>/<product>/classes.json                         the class-id order of the masks
    <out>/generated.parquet                              every pair as a sample row
    <out>/generation.json                                checkpoint, seeds, counts

Why empty masks are redrawn: a defect pair without a defect is useless for training and is a bad
sample for every reader; ``sampling.reject_empty_masks`` redraws it (new seed) up to
``sampling.max_attempts`` times and reports how many it redrew and how many stayed empty. "Empty"
means no pixel of the *requested* defect's class: a pair labelled ``scratch`` whose mask holds
only ``hole`` pixels (an under-trained multi-class model does this) is mislabelled, not a scratch,
and would be a bad sample in the written dataset (``data check`` refuses it). ``generate`` leaves
the pairs still empty after the last attempt out of what it writes (``--keep-empty`` keeps them);
the evaluation keeps them, because how often a generator misses is part of what it measures.

Methods that blend onto defect-free images (``requires_normal_images``, e.g. Crop-Paste) or take
given masks (``requires_masks``) get them from a ``ConditionSource``: defect-free images from the
dataset's ``train/good`` and masks from the few-shot *train* side of the split (never the test
split), drawn per sample with a seeded generator.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectforge.errors import ConfigError, DataError
from defectforge.methods.base import Conditions, Generator, GeneratorContext, SamplingOptions
from defectforge.paths import inside


class ConditionSource:
    """Defect-free images per product and real masks per (product, defect) for ``Conditions``.

    Why a separate object: only some methods need them, and loading them costs a dataset scan;
    ``for_generator`` returns None for methods that need neither, so Defect-Gen's path is unchanged.
    """

    def __init__(self, normal: dict[str, np.ndarray], masks: dict[tuple[str, str], np.ndarray]) -> None:
        self.normal, self.masks = normal, masks

    @classmethod
    def from_dataset(cls, root: str | Path, context: GeneratorContext, normal: bool = True,
                     masks: bool = False, split: Any = None, max_normal: int = 256,
                     seed: int = 0) -> ConditionSource:
        """Load ``train/good`` images (at most ``max_normal`` per product, a seeded choice) and, when
        ``masks``, the masks of the split's training defect images, at the generator's resolution."""
        from defectforge.data.mvtec import load_sample, scan_dataset

        index = scan_dataset(root, list(context.products))
        res = context.resolution
        normal_by: dict[str, np.ndarray] = {}
        if normal:
            rng = np.random.default_rng(seed)
            for p in context.products:
                refs = [r for r in index.refs if r.product == p and r.is_good and r.split == "train"]
                if not refs:
                    raise DataError(f"{root}: product {p!r} has no defect-free images in train/good, "
                                            "which this method pastes onto")
                if len(refs) > max_normal:
                    refs = [refs[i] for i in sorted(rng.choice(len(refs), max_normal, replace=False))]
                normal_by[p] = np.stack([load_sample(r, index.classes[p], res)["image"] for r in refs])
        masks_by: dict[tuple[str, str], np.ndarray] = {}
        if masks:
            from defectforge.config import SplitConfig
            from defectforge.data.splits import make_split

            manifest = make_split(index, split if split is not None else SplitConfig())
            lists: dict[tuple[str, str], list[np.ndarray]] = {}
            for r in manifest.train:
                if not r.is_good:
                    lists.setdefault((r.product, r.defect), []).append(
                        load_sample(r, index.classes[r.product], res)["mask"])
            masks_by = {k: np.stack(v) for k, v in lists.items()}
        return cls(normal_by, masks_by)

    @classmethod
    def for_generator(cls, gen: Generator, data_root: str | Path | None, split: Any = None,
                      seed: int = 0) -> ConditionSource | None:
        """The source ``gen`` needs from ``data_root``, or None when it needs none."""
        if not (gen.requires_normal_images or gen.requires_masks):
            return None
        if data_root is None:
            needs = "defect-free images" if gen.requires_normal_images else "real masks"
            raise ConfigError(f"--data: method {gen.method_name()!r} needs {needs} from a dataset: pass --data PATH")
        return cls.from_dataset(data_root, gen.context, normal=gen.requires_normal_images,
                                masks=gen.requires_masks, split=split, seed=seed)

    def fill(self, gen: Generator, cond: Conditions, seed: int) -> Conditions:
        """``cond`` with ``normal_image`` / ``mask`` drawn for each entry (seeded)."""
        rng = np.random.default_rng([int(seed), 17])
        normal = mask = None
        if gen.requires_normal_images:
            normal = np.stack([self._pick(self.normal, p, p, rng) for p in cond.product])
        if gen.requires_masks:
            mask = np.stack([self._pick(self.masks, (p, d), f"{p}/{d}", rng)
                             for p, d in zip(cond.product, cond.defect)])
        return Conditions(list(cond.product), list(cond.defect), mask, normal)

    @staticmethod
    def _pick(table: dict, key: Any, label: str, rng: np.random.Generator) -> np.ndarray:
        pool = table.get(key)
        if pool is None or len(pool) == 0:
            raise DataError(f"no real images/masks for {label!r} in the --data dataset's training split")
        return pool[int(rng.integers(len(pool)))]


@dataclass
class GenerationPlan:
    """Which (product, defect) each of the n samples is: round-robin over the generator's classes."""

    product: list[str]
    defect: list[str]

    @classmethod
    def balanced(cls, context: GeneratorContext, n: int, products: list[str] | None = None,
                 defects: list[str] | None = None) -> GenerationPlan:
        if n < 1:
            raise ConfigError(f"--n: the number of pairs must be at least 1, got {n}")
        if products:
            unknown = [p for p in products if p not in context.products]
            if unknown:
                raise ConfigError(f"--product(s): unknown product(s) {', '.join(map(repr, unknown))}; the "
                                  f"checkpoint knows {', '.join(context.products)}")
        if defects:
            known = {d for p in (products or context.products) for d in context.classes[p]}
            unknown = [d for d in defects if d not in known]
            if unknown:
                raise ConfigError(f"--defects: unknown defect type(s) {', '.join(map(repr, unknown))}; the "
                                  f"checkpoint knows {', '.join(sorted(known))}")
        pairs = [(p, d) for p in (products or list(context.products)) for d in context.classes[p]
                 if not defects or d in defects]
        if not pairs:
            raise ConfigError(f"no (product, defect) pair matches products={products} defects={defects}; "
                              f"the checkpoint knows {context.classes}")
        chosen = [pairs[i % len(pairs)] for i in range(n)]
        return cls([p for p, _ in chosen], [d for _, d in chosen])


def has_own_defect(masks: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Per pair: does its mask (N,H,W class ids) hold any pixel of its own class ``own`` (N)?"""
    return (masks == np.asarray(own).reshape(-1, 1, 1)).reshape(len(masks), -1).any(axis=1)


def sample_pairs(gen: Generator, plan: GenerationPlan, seed: int, batch_size: int,
                 reject_empty: bool = True, max_attempts: int = 4, progress: bool = True,
                 source: ConditionSource | None = None, id_offset: int = 0,
                 options: SamplingOptions | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Sample rows for ``plan`` in batches; seeds depend only on (seed, batch, attempt).

    ``source`` supplies normal images / masks for methods that require them; ``id_offset`` shifts
    the row ids (``<offset + i>``), so callers that sample one plan in pieces get unique ids;
    ``options`` (None = the generator's ``default_sampling``, i.e. its checkpoint's) go to every
    ``gen.sample`` call. With ``progress`` each batch prints pairs done, pairs/s and time left.
    """
    options = options or gen.default_sampling
    gen.sampling_config(options)  # a bad option fails here, before the first batch
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if max_attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}")
    if (gen.requires_normal_images or gen.requires_masks) and source is None:
        raise ConfigError(f"method {gen.method_name()!r} needs a ConditionSource (defect-free images / masks "
                         "from a dataset): pass --data PATH")

    def conditions(products: list[str], defects: list[str], s: int) -> Conditions:
        cond = Conditions(products, defects)
        return source.fill(gen, cond, s) if source is not None else cond

    rows: list[dict[str, Any]] = []
    stats = {"redrawn": 0, "still_empty": 0}
    n = len(plan.product)
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        cond = conditions(plan.product[start:stop], plan.defect[start:stop], seed * 100_003 + b)
        out = gen.sample(stop - start, cond, seed=seed * 100_003 + b, options=options)
        images, masks = out.images.copy(), out.masks.copy()
        own = np.array([gen.context.class_id(p, d) for p, d in zip(cond.product, cond.defect)])
        for attempt in range(1, max_attempts if reject_empty else 1):
            empty = np.flatnonzero(~has_own_defect(masks, own))
            if len(empty) == 0:
                break
            stats["redrawn"] += len(empty)
            retry_seed = seed * 100_003 + b + 7_919 * attempt
            retry = conditions([cond.product[i] for i in empty], [cond.defect[i] for i in empty], retry_seed)
            again = gen.sample(len(empty), retry, seed=retry_seed, options=options)
            images[empty], masks[empty] = again.images, again.masks
        stats["still_empty"] += int((~has_own_defect(masks, own)).sum())
        for i in range(stop - start):
            rows.append({"image": images[i], "mask": masks[i], "product": cond.product[i],
                         "defect": cond.defect[i], "id": f"{id_offset + start + i:05d}", "split": "synthetic"})
        if progress:
            elapsed = max(time.perf_counter() - t0, 1e-9)
            rate = stop / elapsed
            print(f"[generate] {stop}/{n} pairs  {rate:.2f} pairs/s  {elapsed:.0f} s elapsed, "
                  f"~{(n - stop) / rate:.0f} s left", flush=True)
    return rows, stats


def write_pairs(rows: list[dict[str, Any]], out: str | Path, context: GeneratorContext) -> Path:
    """Write rows in MVTec layout (see module docstring) plus one Parquet file."""
    from defectforge.data.arrow import write_parquet

    root = Path(out)
    # Every name becomes a path: inside() refuses any that is not one safe component or that
    # would land outside ``out`` (names were checked where they entered; this is the last guard).
    for product in sorted({r["product"] for r in rows}):
        inside(root, product).mkdir(parents=True, exist_ok=True)
        (root / product / "classes.json").write_text(json.dumps({"classes": list(context.classes[product])}))
    for row in rows:
        product, defect = row["product"], row["defect"]
        img_dir = inside(root, product, "test", defect)
        gt_dir = inside(root, product, "ground_truth", defect)
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        inside(root, product, "test", defect, f"{row['id']}.png")
        Image.fromarray(row["image"]).save(img_dir / f"{row['id']}.png")
        mask = row["mask"]
        own = context.class_id(product, defect)
        values = set(np.unique(mask).tolist())
        stored = np.where(mask == own, 255, 0).astype(np.uint8) if values <= {0, own} else mask
        Image.fromarray(stored).save(gt_dir / f"{row['id']}_mask.png")
    write_parquet(rows, root / "generated.parquet")
    return root
