"""Sample rows <-> Parquet <-> Ray Data, exactly.

Why these matter: generated datasets are exported and evaluated through Parquet and Ray Data. A
lossy round trip (JPEG, dtype drift, a channel dropped) would change masks' class ids or images'
pixels between the generator and the metric, and nobody would see it.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from defectforge.config import SplitConfig
from defectforge.data.arrow import (
    SCHEMA,
    index_to_parquet,
    read_parquet,
    rows_to_table,
    table_to_rows,
    to_ray_dataset,
    write_parquet,
)
from defectforge.data.mvtec import load_rows, scan_dataset
from defectforge.data.sample import DataError
from defectforge.data.splits import make_split

TEXT = ("product", "defect", "id", "split")


def _random_rows(n: int = 4, seed: int = 0) -> list[dict]:
    """Rows of several sizes (not square) with class-id masks 0..5 and full-range pixels."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = 9 + 3 * i, 14 - i
        rows.append(dict(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                         mask=rng.integers(0, 6, (h, w), dtype=np.uint8),
                         product=f"prod{i % 2}", defect=("good", "hole", "crack ü", "stain")[i % 4],
                         id=f"{i:03d}", split=("train", "test")[i % 2]))
    return rows


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for c in TEXT:
            assert g[c] == w[c] and isinstance(g[c], str)
        for c in ("image", "mask"):
            assert g[c].dtype == np.uint8 and g[c].shape == w[c].shape, c
            assert np.array_equal(g[c], w[c]), (c, w["id"])


@pytest.fixture(scope="module")
def synth_rows(synth_root) -> list[dict]:
    index = scan_dataset(synth_root)
    refs = []
    for product in index.products:  # two good images and every 6th defect image of each product
        refs += [g for g in index.good_refs() if g.product == product][:2] + index.defect_refs(product)[::6]
    rows, _ = load_rows(index, refs, 48)
    return rows


def test_parquet_round_trip_is_exact(tmp_path, synth_rows):
    rows = synth_rows + _random_rows()
    path = write_parquet(rows, tmp_path / "deep" / "rows.parquet")
    assert path.is_file()
    _assert_same_rows(read_parquet(path), rows)
    # the grayscale product's rows come back with 3 (equal) channels, as they went in
    metal = [r for r in read_parquet(path) if r["product"] == "metal"]
    assert metal and all(np.array_equal(r["image"][..., 0], r["image"][..., 2]) for r in metal)


def test_table_schema_and_lossless_png_columns(synth_rows):
    table = rows_to_table(synth_rows)
    assert table.schema.equals(SCHEMA)
    assert table.num_rows == len(synth_rows)
    assert table.column("height").to_pylist() == [r["image"].shape[0] for r in synth_rows]
    for blob in table.column("mask").to_pylist() + table.column("image").to_pylist():
        assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_same_rows(table_to_rows(table), synth_rows)


def test_bad_rows_and_files_are_rejected(tmp_path):
    row = _random_rows(1)[0]
    with pytest.raises(ValueError, match="prod0/good/000: image must be HxWx3"):
        rows_to_table([dict(row, image=row["image"][..., 0])])
    with pytest.raises(ValueError, match="mask HxW of the same size"):
        rows_to_table([dict(row, mask=row["mask"][:-1])])

    missing = tmp_path / "none.parquet"
    with pytest.raises(DataError, match="not found") as err:
        read_parquet(missing)
    assert str(missing) in str(err.value)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file") as err:
        read_parquet(junk)
    assert str(junk) in str(err.value)
    other = tmp_path / "other.parquet"
    pq.write_table(rows_to_table([row]).drop(["mask"]), other)
    with pytest.raises(DataError, match=r"missing column\(s\) \['mask'\]"):
        read_parquet(other)


def test_a_split_converts_to_parquet(tmp_path, synth_root):
    index = scan_dataset(synth_root, ["fabric"])
    manifest = make_split(index, SplitConfig(protocol="first-k", k=2))
    refs = [r for r in manifest.train if not r.is_good]
    path, bad = index_to_parquet(index, refs, 32, tmp_path / "train.parquet")
    assert bad == []
    rows = read_parquet(path)
    assert sorted((r["defect"], r["id"]) for r in rows) == sorted((r.defect, r.id) for r in refs)
    assert all(r["image"].shape == (32, 32, 3) and r["mask"].any() for r in rows)
    expected, _ = load_rows(index, refs, 32)
    _assert_same_rows(rows, expected)


def test_ray_dataset_from_rows_and_from_parquet(tmp_path, synth_rows, ray_session):
    rows = synth_rows[:6] + _random_rows(3)
    key = lambda r: (r["product"], r["defect"], r["id"])  # noqa: E731 - Ray does not promise row order
    want = sorted(rows, key=key)
    from_rows = to_ray_dataset(rows).take_all()
    _assert_same_rows(sorted(from_rows, key=key), want)
    path = write_parquet(rows, tmp_path / "rows.parquet")
    from_file = to_ray_dataset(path).take_all()
    _assert_same_rows(sorted(from_file, key=key), want)
