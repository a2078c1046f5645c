"""Sample rows <-> Arrow / Parquet / Ray Data.

Why PNG bytes inside Parquet: the contract says masks are stored lossless and images may be any
size; PNG is lossless, compact for masks (mostly zeros) and readable by any tool, and one binary
column per array keeps the schema flat. Decoding back gives exactly the arrays that went in.

Columns: ``product, defect, id, split`` (string), ``height, width`` (int32), ``image, mask`` (PNG).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from defectforge.data.sample import BadSampleError, DataError, DatasetIndex, SampleRef

TEXT_COLUMNS = ("product", "defect", "id", "split")
SCHEMA = pa.schema([*(pa.field(c, pa.string()) for c in TEXT_COLUMNS),
                    pa.field("height", pa.int32()), pa.field("width", pa.int32()),
                    pa.field("image", pa.binary()), pa.field("mask", pa.binary())])


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).copy()


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for r in rows:
        image, mask = np.asarray(r["image"], dtype=np.uint8), np.asarray(r["mask"], dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
            raise ValueError(f"row {r.get('product')}/{r.get('defect')}/{r.get('id')}: image must be HxWx3 and "
                             f"mask HxW of the same size (got {image.shape} and {mask.shape})")
        for c in TEXT_COLUMNS:
            cols[c].append(str(r[c]))
        cols["height"].append(image.shape[0])
        cols["width"].append(image.shape[1])
        cols["image"].append(encode_png(image))
        cols["mask"].append(encode_png(mask))
    return pa.table(cols, schema=SCHEMA)


def decode_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A columnar batch with PNG columns -> the same batch with uint8 arrays (Ray Data map_batches).

    Image / mask columns that are already arrays pass through: the evaluation's own
    ``artifacts/pairs`` Parquet files keep them in Ray Data's tensor type (``evaluate/blocks.py``),
    so a crashed or finished evaluation's pairs can be scored again with ``evaluate --generated``."""
    out = {c: list(batch[c]) for c in TEXT_COLUMNS}
    out["image"] = [_pixels(b) for b in batch["image"]]
    out["mask"] = [_pixels(b) for b in batch["mask"]]
    return out


def _pixels(value: Any) -> np.ndarray:
    return decode_png(value) if isinstance(value, (bytes, bytearray)) else np.asarray(value, np.uint8)


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    missing = {f.name for f in SCHEMA} - set(table.column_names)
    if missing:
        raise DataError(f"table is not a defectforge sample table: missing column(s) {sorted(missing)}")
    return [dict(image=decode_png(r["image"]), mask=decode_png(r["mask"]), **{c: r[c] for c in TEXT_COLUMNS})
            for r in table.select([*TEXT_COLUMNS, "image", "mask"]).to_pylist()]


def write_parquet(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows), path)
    return path


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"Parquet file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return table_to_rows(table)


def to_ray_dataset(source: str | Path | list[dict[str, Any]]):
    """A Ray Dataset of decoded sample rows from rows in memory or a Parquet file/folder."""
    import ray.data

    ds = ray.data.from_arrow(rows_to_table(source)) if isinstance(source, list) else ray.data.read_parquet(str(source))
    return ds.map_batches(decode_batch, batch_format="numpy", batch_size=64)


def index_to_parquet(index: DatasetIndex, refs: list[SampleRef] | None, resolution: int, path: str | Path,
                     on_bad_sample: str = "error") -> tuple[Path, list[tuple[Path, str]]]:
    """Convert a dataset (or a split's refs) to one Parquet file; returns (path, skipped samples)."""
    from defectforge.data.mvtec import load_rows

    rows, bad = load_rows(index, refs, resolution, on_bad_sample)
    return write_parquet(rows, path), bad


__all__ = ["BadSampleError", "decode_batch", "decode_png", "encode_png", "index_to_parquet", "read_parquet",
           "rows_to_table", "table_to_rows", "to_ray_dataset", "write_parquet"]
