"""Output blocks of the evaluation's actor pass -> Parquet files, pair dicts, feature rows.

Why a module of its own: ``finish_block`` runs as a Ray task in a plain worker, and Ray imports the
function's module there. This module needs only numpy, pyarrow and Ray Data's block accessor; the
pipeline module imports torch and the metric stack, several seconds per fresh worker (profile of
issue 12), which a task that only rewrites a block must not pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PAIR_COLUMNS = ["image", "mask", "product", "defect", "id", "split"]
FEATURE_COLUMNS = ["source", "product", "defect", "id", "features", "logits"]


def finish_block(block: Any, start: int | None, stop: int | None, index: int, pairs_dir: str,
                 features_dir: str) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray]]:
    """One output block of the actor pass -> (pair columns as numpy, or None for real rows; feature rows).

    Runs as a Ray task next to the block: writes the block's Parquet files (``part-<index>``) and
    splits pixels from feature rows, so only the feature rows go to the driver.
    """
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    if start is not None:
        acc = BlockAccessor.for_block(acc.slice(start, stop, copy=False))
    table = acc.to_arrow()
    name = f"part-{index:05d}.parquet"
    pq.write_table(table.select(FEATURE_COLUMNS), str(Path(features_dir) / name))
    # LPIPS embeddings made in the pass (``pipeline.lpips_in_pass``) go to the driver with the
    # feature rows, for the diversity stage; they are not worth a Parquet file.
    extra = [c for c in ("lpips",) if c in table.column_names]
    features = BlockAccessor.for_block(table.select(FEATURE_COLUMNS + extra)).to_numpy()
    pairs = None
    if "image" in table.column_names:
        pq.write_table(table.select(PAIR_COLUMNS), str(Path(pairs_dir) / name))
        pairs = BlockAccessor.for_block(table.select(PAIR_COLUMNS)).to_numpy()
    return pairs, features
