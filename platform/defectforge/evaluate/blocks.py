"""Output blocks of the evaluation's map pass -> Parquet files, pair dicts, feature rows.

Why a module of its own: ``split_block`` runs as a Ray task in a plain worker (a big evaluation)
and ``write_parts`` in the map tasks, and Ray imports a function's module where it runs. This
module needs only numpy, pyarrow and Ray Data's block accessor; the pipeline module imports torch
and the metric stack, several seconds per fresh worker (profile of issue 12), which a task that
only splits a block must not pay.

An output block may hold generated rows (with pixels) and real reference rows together: the real
rows ride in the first conditions blocks (``pipeline.run_pipeline``). Only generated rows are
pairs; every row has a feature row.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

PAIR_COLUMNS = ["image", "mask", "product", "defect", "id", "split"]
FEATURE_COLUMNS = ["source", "product", "defect", "id", "features", "logits"]
GENERATED = "generated"  # ``actors.GENERATED``, without importing the actors' module


def part_name(out: dict[str, np.ndarray]) -> str:
    """``part-<digest>.parquet``: named by the rows it holds (source, product, defect, id), so a
    map task names its files without a counter shared with other tasks, and the same rows always
    get the same name."""
    h = hashlib.sha1()
    for c in ("source", "product", "defect", "id"):
        h.update("\x1f".join(map(str, np.asarray(out[c]).tolist())).encode())
        h.update(b"\x1e")
    return f"part-{h.hexdigest()[:16]}.parquet"


def pair_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The generated rows' ``PAIR_COLUMNS`` of a numpy batch, or None if it has no generated rows
    with pixels (real rows are featurised only; they are never pairs)."""
    generated = np.asarray(batch["source"]).astype(str) == GENERATED
    if "image" not in batch or not generated.any():
        return None
    return {c: np.asarray(batch[c])[generated] for c in PAIR_COLUMNS}


def write_parts(out: dict[str, np.ndarray], pairs_dir: str, features_dir: str) -> None:
    """Write one map output (a numpy batch) as ``<features_dir>/part-*.parquet`` (every row's
    ``FEATURE_COLUMNS``) and ``<pairs_dir>/part-*.parquet`` (the generated rows' ``PAIR_COLUMNS``).

    Runs inside the map task that made the batch (issue 12: as a separate ``finish_block`` task per
    block it cost ~40 ms of a shared core per block plus a scheduling round, and in the driver
    ~80 ms per block of serial time). Ray Data's own batch -> Arrow conversion keeps image columns
    in its tensor extension type, as ``Dataset.write_parquet`` would."""
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    n = len(np.asarray(out["source"]))
    if n == 0:
        return
    name = part_name(out)
    features = BlockAccessor.batch_to_block({c: np.asarray(out[c]) for c in FEATURE_COLUMNS})
    pq.write_table(features, str(Path(features_dir) / name))
    pairs = pair_columns(out)
    if pairs is not None:
        pq.write_table(BlockAccessor.batch_to_block(pairs), str(Path(pairs_dir) / name))


def split_block(block: Any, start: int | None = None,
                stop: int | None = None) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray]]:
    """One output block of the map pass -> (the generated rows' pair columns as numpy, or None if it
    has none; every row's feature columns, plus ``lpips`` where the pass made LPIPS embeddings).

    In the driver for a small evaluation (``pipeline.diversity_on_driver``: at most 64 MiB of
    generated pixels, plus the real reference rows the blocks carry); as a Ray task next to the
    block for a big one, so only feature rows travel to the driver and the pixels stay in the
    object store (``PipelineResult.pair_refs``)."""
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    if start is not None:
        acc = BlockAccessor.for_block(acc.slice(start, stop, copy=False))
    names = set(acc.column_names())
    extra = [c for c in ("lpips",) if c in names]
    batch = acc.to_numpy(FEATURE_COLUMNS + extra + [c for c in PAIR_COLUMNS if c in names and c not in FEATURE_COLUMNS])
    return pair_columns(batch), {c: batch[c] for c in FEATURE_COLUMNS + extra}
