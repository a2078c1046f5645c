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
``sampling.max_attempts`` times and reports how many it redrew and how many stayed empty.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectforge.methods.base import Conditions, Generator, GeneratorContext


@dataclass
class GenerationPlan:
    """Which (product, defect) each of the n samples is: round-robin over the generator's classes."""

    product: list[str]
    defect: list[str]

    @classmethod
    def balanced(cls, context: GeneratorContext, n: int, products: list[str] | None = None,
                 defects: list[str] | None = None) -> GenerationPlan:
        pairs = [(p, d) for p in (products or list(context.products)) for d in context.classes[p]
                 if not defects or d in defects]
        if products:
            unknown = [p for p in products if p not in context.products]
            if unknown:
                raise KeyError(f"unknown product(s) {unknown}; the checkpoint knows {list(context.products)}")
        if not pairs:
            raise KeyError(f"no (product, defect) pair matches products={products} defects={defects}; "
                           f"the checkpoint knows {context.classes}")
        chosen = [pairs[i % len(pairs)] for i in range(n)]
        return cls([p for p, _ in chosen], [d for _, d in chosen])


def sample_pairs(gen: Generator, plan: GenerationPlan, seed: int, batch_size: int,
                 reject_empty: bool = True, max_attempts: int = 4, progress: bool = True,
                 **sample_kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Sample rows for ``plan`` in batches; seeds depend only on (seed, batch, attempt)."""
    rows: list[dict[str, Any]] = []
    stats = {"redrawn": 0, "still_empty": 0}
    n = len(plan.product)
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        cond = Conditions(plan.product[start:stop], plan.defect[start:stop])
        out = gen.sample(stop - start, cond, seed=seed * 100_003 + b, **sample_kwargs)
        images, masks = out.images.copy(), out.masks.copy()
        for attempt in range(1, max_attempts if reject_empty else 1):
            empty = np.flatnonzero(masks.reshape(len(masks), -1).max(axis=1) == 0)
            if len(empty) == 0:
                break
            stats["redrawn"] += len(empty)
            retry = Conditions([cond.product[i] for i in empty], [cond.defect[i] for i in empty])
            again = gen.sample(len(empty), retry, seed=seed * 100_003 + b + 7_919 * attempt, **sample_kwargs)
            images[empty], masks[empty] = again.images, again.masks
        stats["still_empty"] += int((masks.reshape(len(masks), -1).max(axis=1) == 0).sum())
        for i in range(stop - start):
            rows.append({"image": images[i], "mask": masks[i], "product": cond.product[i],
                         "defect": cond.defect[i], "id": f"{start + i:05d}", "split": "synthetic"})
        if progress:
            rate = stop / max(time.perf_counter() - t0, 1e-9)
            print(f"[generate] {stop}/{n} pairs  {rate:.2f} pairs/s", flush=True)
    return rows, stats


def write_pairs(rows: list[dict[str, Any]], out: str | Path, context: GeneratorContext) -> Path:
    """Write rows in MVTec layout (see module docstring) plus one Parquet file."""
    from defectforge.data.arrow import write_parquet

    root = Path(out)
    for product in sorted({r["product"] for r in rows}):
        (root / product).mkdir(parents=True, exist_ok=True)
        (root / product / "classes.json").write_text(json.dumps({"classes": list(context.classes[product])}))
    for row in rows:
        product, defect = row["product"], row["defect"]
        img_dir = root / product / "test" / defect
        gt_dir = root / product / "ground_truth" / defect
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row["image"]).save(img_dir / f"{row['id']}.png")
        mask = row["mask"]
        own = context.class_id(product, defect)
        values = set(np.unique(mask).tolist())
        stored = np.where(mask == own, 255, 0).astype(np.uint8) if values <= {0, own} else mask
        Image.fromarray(stored).save(gt_dir / f"{row['id']}_mask.png")
    write_parquet(rows, root / "generated.parquet")
    return root
