"""Few-shot split protocols: disjoint, reproducible for a seed, leak-free by group, clear errors.

Why these matter: the published code this product replaces leaked one test image into training and
cut the magnetic tiles (six exposures of each tile) by id, so the same tile sat on both sides. A
split that is not disjoint, or not the same on a rerun, makes every downstream number meaningless.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.config import SplitConfig
from defectforge.data.mvtec import scan_dataset
from defectforge.data.sample import DataError, SampleRef
from defectforge.data.splits import SplitManifest, carve_validation, make_split, read_groups

PROTOCOLS = ("lowest-third", "first-k", "half", "group")
TRAIN_PER_TYPE = {"lowest-third": 4, "first-k": 5, "half": 6, "group": 4}  # of 12 per synthetic type


def _by_type(refs: list[SampleRef]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in refs:
        if not r.is_good:
            out[(r.product, r.defect)].append(r.id)
    return {k: sorted(v) for k, v in out.items()}


def _assert_disjoint_and_complete(index, manifest: SplitManifest) -> None:
    train = {r.image_path for r in manifest.train}
    test = {r.image_path for r in manifest.test}
    assert not train & test
    assert train | test == {r.image_path for r in index.refs}
    assert len(manifest.train) == len(train) and len(manifest.test) == len(test)  # no duplicates
    # defect-free images keep their folder
    assert {r.image_path for r in index.good_refs("train")} <= train
    assert {r.image_path for r in index.good_refs("test")} <= test


def _make_ids_tree(pdir: Path, ids: list[str], defect: str = "dent") -> Path:
    """One product, one defect type, images with the given ids (and 0/255 masks)."""
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    for sid in ids:
        for path, arr in ((pdir / "test" / defect / f"{sid}.png", img),
                          (pdir / "ground_truth" / defect / f"{sid}_mask.png", mask)):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return pdir


# ----------------------------------------------------------------- every protocol, synthetic
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocol_is_disjoint_and_reproducible(synth_root, protocol):
    cfg = SplitConfig(protocol=protocol, seed=3)
    index = scan_dataset(synth_root)
    manifest = make_split(index, cfg)
    _assert_disjoint_and_complete(index, manifest)
    train, test = _by_type(manifest.train), _by_type(manifest.test)
    assert set(train) == set(test) == {(r.product, r.defect) for r in index.defect_refs()}
    for key in train:
        assert len(train[key]) == TRAIN_PER_TYPE[protocol], (key, train[key])
        assert len(test[key]) == 12 - TRAIN_PER_TYPE[protocol]
    # same seed, fresh scan -> the same manifest
    again = make_split(scan_dataset(synth_root), SplitConfig(protocol=protocol, seed=3))
    assert again.to_json() == manifest.to_json()
    doc = manifest.to_json()
    assert doc["protocol"] == protocol and doc["seed"] == 3
    assert doc["n_train"] == len(manifest.train) and doc["n_test"] == len(manifest.test)
    assert json.loads(json.dumps(doc)) == doc  # loggable as JSON


@pytest.mark.parametrize("protocol", ["half", "group"])
def test_seeded_protocols_change_with_the_seed(synth_root, protocol):
    index = scan_dataset(synth_root)
    a = make_split(index, SplitConfig(protocol=protocol, seed=0)).to_json()
    b = make_split(index, SplitConfig(protocol=protocol, seed=1)).to_json()
    assert a["train"] != b["train"]
    assert a["n_train"] == b["n_train"]  # same sizes, other members


@pytest.mark.parametrize("protocol", ["lowest-third", "first-k"])
def test_id_protocols_ignore_the_seed(synth_root, protocol):
    index = scan_dataset(synth_root)
    a = make_split(index, SplitConfig(protocol=protocol, seed=0)).to_json()
    b = make_split(index, SplitConfig(protocol=protocol, seed=1)).to_json()
    assert a["train"] == b["train"]


def test_split_is_the_same_in_another_process(synth_root):
    """Seeds go through crc32, not hash(): a new interpreter with another PYTHONHASHSEED agrees."""
    code = ("import json, sys; from defectforge.config import SplitConfig; "
            "from defectforge.data.mvtec import scan_dataset; from defectforge.data.splits import make_split; "
            "print(json.dumps(make_split(scan_dataset(sys.argv[1]), "
            "SplitConfig(protocol='group', seed=5)).to_json()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(synth_root)], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    here = make_split(scan_dataset(synth_root), SplitConfig(protocol="group", seed=5)).to_json()
    assert json.loads(out) == here


# ------------------------------------------------------------------ protocol definitions
def test_lowest_third_takes_floor_n_over_3_lowest_numeric_ids(tmp_path):
    ids = [str(i) for i in range(1, 12)]  # 11 ids, unpadded: string order would put "10" before "2"
    index = scan_dataset(_make_ids_tree(tmp_path / "p", ids))
    m = make_split(index, SplitConfig(protocol="lowest-third"))
    assert m.ids("train") == {"p/dent": ["1", "2", "3"]}  # floor(11 / 3) = 3
    assert m.ids("test") == {"p/dent": [str(i) for i in range(4, 12)]}


def test_lowest_third_on_synthetic_takes_the_first_ids(synth_root):
    m = make_split(scan_dataset(synth_root), SplitConfig(protocol="lowest-third"))
    for key, ids in m.ids("train").items():
        if not key.endswith("/good"):
            assert ids == ["000", "001", "002", "003"], key


def test_first_k_takes_k_lowest_ids(tmp_path, synth_root):
    index = scan_dataset(_make_ids_tree(tmp_path / "p", ["9", "10", "2", "30", "4"]))
    m = make_split(index, SplitConfig(protocol="first-k", k=2))
    assert m.ids("train") == {"p/dent": ["2", "4"]}
    m = make_split(scan_dataset(synth_root), SplitConfig(protocol="first-k", k=7))
    assert all(len(v) == 7 for k, v in m.ids("train").items() if not k.endswith("/good"))


def test_group_split_on_synthetic_keeps_groups_whole(synth_root):
    index = scan_dataset(synth_root)
    cfg = SplitConfig(protocol="group", seed=0)
    m = make_split(index, cfg)
    groups = read_groups(index, None, "group")
    assert set(groups) == {r.image_path for r in index.defect_refs()}
    g_train = {groups[r.image_path] for r in m.train if not r.is_good}
    g_test = {groups[r.image_path] for r in m.test if not r.is_good}
    assert g_train and g_test and not g_train & g_test
    # every group of the synthetic data is one part at two exposures: ids 2g and 2g+1 travel together
    for ids in m.ids("train").values():
        assert all(int(i) // 2 == int(j) // 2 for i, j in zip(ids[::2], ids[1::2]))


def test_group_split_on_magnetic_tile_is_leak_free(magnetic_tile):
    index = scan_dataset(magnetic_tile)
    m = make_split(index, SplitConfig(protocol="group", seed=0))
    _assert_disjoint_and_complete(index, m)
    groups = read_groups(index, None, "group")
    for defect in index.classes["magnetic_tile"]:
        tr = [r for r in m.train if r.defect == defect]
        te = [r for r in m.test if r.defect == defect]
        assert tr and te, defect
        assert not {groups[r.image_path] for r in tr} & {groups[r.image_path] for r in te}, defect
        n = len(tr) + len(te)
        assert len(tr) >= n / 3 and len(te) > n / 3, (defect, len(tr), n)  # ~1/3 trains, by whole groups
    again = make_split(scan_dataset(magnetic_tile), SplitConfig(protocol="group", seed=0))
    assert again.to_json() == m.to_json()
    assert make_split(index, SplitConfig(protocol="group", seed=1)).to_json()["train"] != m.to_json()["train"]


def test_id_cut_on_magnetic_tile_leaks_a_tile_and_the_manifest_catches_it(magnetic_tile):
    """Why ``group`` exists: the lowest-third cut shares a tile between train and test (README:
    blowhole, crack and fray share one group each); given the groups, the manifest refuses it."""
    index = scan_dataset(magnetic_tile)
    m = make_split(index, SplitConfig(protocol="lowest-third"))
    groups = read_groups(index, None, "group")
    with pytest.raises(DataError, match="on both sides"):
        SplitManifest(m.protocol, m.seed, m.train, m.test, groups)


# ------------------------------------------------------------------------------- errors
def test_k_too_big_is_a_data_error_naming_the_type(synth_root):
    with pytest.raises(DataError, match=r"first-k split: fabric/hole has 12 .*no test image \(k=12\)"):
        make_split(scan_dataset(synth_root), SplitConfig(protocol="first-k", k=12))


def test_too_few_images_for_lowest_third(tmp_path):
    index = scan_dataset(_make_ids_tree(tmp_path / "p", ["1", "2"]))
    with pytest.raises(DataError, match=r"p/dent has 2 .*no training image"):
        make_split(index, SplitConfig(protocol="lowest-third"))


def test_missing_metadata_column_names_file_and_column(synth_root):
    with pytest.raises(DataError, match=r"missing column\(s\) \['tile'\]") as err:
        make_split(scan_dataset(synth_root), SplitConfig(protocol="group", group_column="tile"))
    assert str(synth_root / "metadata.csv") in str(err.value)


def test_metadata_problems_name_the_file(tmp_path, synth_root):
    index = scan_dataset(_make_ids_tree(tmp_path / "p", ["1", "2", "3", "4"]))
    with pytest.raises(DataError, match="needs a metadata CSV"):
        make_split(index, SplitConfig(protocol="group"))
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="metadata file not found") as err:
        make_split(index, SplitConfig(protocol="group", metadata=str(missing)))
    assert str(missing) in str(err.value)

    meta = tmp_path / "p" / "metadata.csv"  # a per-product metadata file, one row missing
    with open(meta, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["cls", "id", "group"], ["dent", "1", "a"], ["dent", "2", "a"], ["dent", "3", "b"]])
    with pytest.raises(DataError, match="has no row in the metadata") as err:
        make_split(scan_dataset(tmp_path / "p"), SplitConfig(protocol="group"))
    assert str(tmp_path / "p" / "test" / "dent" / "4.png") in str(err.value)

    with open(meta, "a", newline="") as fh:
        csv.writer(fh).writerow(["dent", "4", "a"])  # now every image is in group "a" or "b"
    m = make_split(scan_dataset(tmp_path / "p"), SplitConfig(protocol="group", seed=0))
    assert sorted(len(v) for v in (m.ids("train")["p/dent"], m.ids("test")["p/dent"])) == [1, 3]

    with open(meta, "w", newline="") as fh:
        csv.writer(fh).writerows([["cls", "id", "group"]] + [["dent", str(i), "same"] for i in range(1, 5)])
    with pytest.raises(DataError, match="p/dent has 1 group"):
        make_split(scan_dataset(tmp_path / "p"), SplitConfig(protocol="group"))


def test_metadata_without_product_column_over_several_products_is_ambiguous(tmp_path, synth_root):
    """Both synthetic products have ``hole/000``: without a product column the row is ambiguous,
    and taking either group could put one part on both sides."""
    meta = tmp_path / "meta.csv"
    with open(synth_root / "metadata.csv", newline="") as src, open(meta, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["cls", "id", "group"])
        w.writerows([r["cls"], r["id"], r["group"]] for r in csv.DictReader(src))
    with pytest.raises(DataError, match=r"2 different 'group' values .*add a 'product' column") as err:
        make_split(scan_dataset(synth_root), SplitConfig(protocol="group", metadata=str(meta)))
    assert str(meta) in str(err.value)


def test_manifest_refuses_overlapping_sides(synth_root):
    refs = scan_dataset(synth_root).defect_refs()
    with pytest.raises(DataError, match="1 image\\(s\\) on both sides"):
        SplitManifest("half", 0, refs[:5], refs[4:10])
    groups = {r.image_path: "g" for r in refs[:4]}
    with pytest.raises(DataError, match="group\\(s\\) \\['g'\\] on both sides"):
        SplitManifest("group", 0, refs[:2], refs[2:4], groups)
    SplitManifest("half", 0, refs[:5], refs[5:10])  # disjoint: fine


# -------------------------------------------------------------------- validation carve
def test_carve_validation_is_disjoint_stratified_and_deterministic(synth_root):
    index = scan_dataset(synth_root)
    refs = make_split(index, SplitConfig(protocol="half", seed=0)).train
    train, val = carve_validation(refs, 0.25, seed=7)
    assert not {r.image_path for r in train} & {r.image_path for r in val}
    assert sorted(map(str, (r.image_path for r in train + val))) == sorted(str(r.image_path) for r in refs)
    strata = {(r.product, r.defect) for r in refs}
    for key in strata:  # every stratum has members on both sides, ~25 % in validation
        n_tr = sum((r.product, r.defect) == key for r in train)
        n_va = sum((r.product, r.defect) == key for r in val)
        assert n_tr >= 1 and n_va >= 1, key
        assert n_va == max(1, round(0.25 * (n_tr + n_va))), key
    again = carve_validation(list(reversed(refs)), 0.25, seed=7)
    assert again == (train, val)  # input order does not matter
    other = carve_validation(refs, 0.25, seed=8)
    assert {r.image_path for r in other[1]} != {r.image_path for r in val}


def test_carve_validation_by_group_keeps_groups_whole(synth_root):
    index = scan_dataset(synth_root)
    groups = read_groups(index, None, "group")
    refs = index.defect_refs()
    train, val = carve_validation(refs, 0.3, seed=0, groups=groups)
    g_train, g_val = {groups[r.image_path] for r in train}, {groups[r.image_path] for r in val}
    assert g_val and not g_train & g_val
    for key in {(r.product, r.defect) for r in refs}:
        assert any((r.product, r.defect) == key for r in val), key


def test_carve_validation_edge_cases(synth_root):
    refs = scan_dataset(synth_root).defect_refs()
    single = refs[:1]
    assert carve_validation(single, 0.5, seed=0) == (single, [])  # one item stays in training
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="validation fraction"):
            carve_validation(refs, bad, seed=0)


# ------------------------------------------------------------------ bring-your-own: manifest, all
def _write_manifest(path: Path, rows: list[list[str]], header=("product", "defect", "id", "side")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _even_train_rows(index) -> list[list[str]]:
    """Every defective image, even ids on the train side: a split no built-in protocol makes."""
    return [[r.product, r.defect, r.id, "train" if int(r.id) % 2 == 0 else "test"] for r in index.defect_refs()]


def test_manifest_split_follows_the_csv(synth_root, tmp_path):
    index = scan_dataset(synth_root)
    path = _write_manifest(tmp_path / "split.csv", _even_train_rows(index))
    m = make_split(index, SplitConfig(protocol="manifest", manifest=str(path)))
    _assert_disjoint_and_complete(index, m)
    for key, ids in _by_type(m.train).items():
        assert ids == [f"{i:03d}" for i in range(0, 12, 2)], key
    for key, ids in _by_type(m.test).items():
        assert ids == [f"{i:03d}" for i in range(1, 12, 2)], key
    assert m.to_json()["protocol"] == "manifest"
    # one manifest serves any product selection: rows of unselected products are skipped
    fabric = scan_dataset(synth_root, ["fabric"])
    mf = make_split(fabric, SplitConfig(protocol="manifest", manifest=str(path)))
    assert {r.product for r in mf.train + mf.test} == {"fabric"}
    assert _by_type(mf.train) == {k: v for k, v in _by_type(m.train).items() if k[0] == "fabric"}


def test_manifest_id_on_both_sides_names_file_line_and_image(synth_root, tmp_path):
    index = scan_dataset(synth_root)
    rows = _even_train_rows(index)
    rows.append(["metal", "scratch", "004", "test"])  # 004 is already on the train side
    path = _write_manifest(tmp_path / "split.csv", rows)
    line = len(rows) + 1  # + the header
    with pytest.raises(DataError, match=rf"line {line}: metal/scratch/004 is on both sides \(train at line \d+, "
                                        r"test here\)") as err:
        make_split(index, SplitConfig(protocol="manifest", manifest=str(path)))
    assert str(path) in str(err.value)
    rows[-1] = ["metal", "scratch", "004", "train"]  # the same row twice on the same side: harmless
    make_split(index, SplitConfig(protocol="manifest", manifest=str(_write_manifest(path, rows))))


def test_manifest_missing_id_names_file_line_and_id(synth_root, tmp_path):
    index = scan_dataset(synth_root)
    rows = _even_train_rows(index)
    rows.insert(3, ["fabric", "hole", "999", "test"])
    path = _write_manifest(tmp_path / "split.csv", rows)
    with pytest.raises(DataError, match=r"line 5: no image fabric/hole with id '999' in the dataset .*ids there: 000") \
            as err:
        make_split(index, SplitConfig(protocol="manifest", manifest=str(path)))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("bad_row, message", [
    (["fabric", "hole", "000", "val"], r"line 2: side 'val' is neither 'train' nor 'test'"),
    (["fabric", "dent", "000", "train"], r"line 2: 'fabric' has no defect type 'dent'"),
    (["plastic", "hole", "000", "train"], r"line 2: product 'plastic' is not in the dataset"),
    (["fabric", "good", "000", "train"], r"line 2: fabric/good/000: defect-free images keep their folder"),
    (["fabric", "hole", "", "train"], r"line 2: empty \['id'\]"),
])
def test_manifest_bad_rows_are_data_errors(synth_root, tmp_path, bad_row, message):
    index = scan_dataset(synth_root)
    path = _write_manifest(tmp_path / "split.csv", [bad_row] + _even_train_rows(index))
    with pytest.raises(DataError, match=message) as err:
        make_split(index, SplitConfig(protocol="manifest", manifest=str(path)))
    assert str(path) in str(err.value)


def test_manifest_file_problems(synth_root, tmp_path):
    index = scan_dataset(synth_root)
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="split manifest not found") as err:
        make_split(index, SplitConfig(protocol="manifest", manifest=str(missing)))
    assert str(missing) in str(err.value)
    no_side = _write_manifest(tmp_path / "a.csv", [["fabric", "hole", "000"]], header=("product", "defect", "id"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['side'\]") as err:
        make_split(index, SplitConfig(protocol="manifest", manifest=str(no_side)))
    assert str(no_side) in str(err.value)
    rows = _even_train_rows(index)
    partial = _write_manifest(tmp_path / "b.csv", rows[1:])  # one image left out
    with pytest.raises(DataError, match=r"1 defective image\(s\) of the dataset are not in the split manifest, "
                                        rf"e\.g\. {rows[0][0]}/{rows[0][1]}/{rows[0][2]}"):
        make_split(index, SplitConfig(protocol="manifest", manifest=str(partial)))
    no_train = _write_manifest(tmp_path / "c.csv", [r[:3] + ["test" if r[:2] == ["metal", "stain"] else r[3]]
                                                     for r in rows])
    with pytest.raises(DataError, match="metal/stain has no image on the train side"):
        make_split(index, SplitConfig(protocol="manifest", manifest=str(no_train)))


def test_manifest_protocol_needs_a_file_and_resolves_it(tmp_path, monkeypatch):
    from defectforge.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=r"data\.split\.manifest: protocol=manifest needs the CSV file"):
        resolve_config(method="crop-paste", preset="tiny", overrides=["data.split.protocol=manifest"])
    monkeypatch.chdir(tmp_path)
    cfg = SplitConfig(protocol="manifest", manifest="split.csv")
    assert cfg.manifest == str(tmp_path / "split.csv")  # Ray workers elsewhere read the same file


def test_all_protocol_trains_on_every_defective_image(synth_root):
    index = scan_dataset(synth_root)
    m = make_split(index, SplitConfig(protocol="all"))
    _assert_disjoint_and_complete(index, m)
    assert {r.image_path for r in m.train} == {r.image_path for r in index.defect_refs() + index.good_refs("train")}
    assert m.test and all(r.is_good for r in m.test)  # only test/good is left for testing
    assert {r.image_path for r in m.test} == {r.image_path for r in index.good_refs("test")}
    assert all(len(v) == 12 for k, v in m.ids("train").items() if not k.endswith("/good"))


# ------------------------------------------------------------------------------- zero-shot
@pytest.mark.parametrize("protocol", ["lowest-third", "half", "all"])
def test_zero_shot_puts_every_defect_of_a_listed_product_on_the_test_side(synth_root, protocol):
    index = scan_dataset(synth_root)
    plain = make_split(index, SplitConfig(protocol=protocol, seed=3))
    zero = make_split(index, SplitConfig(protocol=protocol, seed=3, zero_shot=["metal"]))
    _assert_disjoint_and_complete(index, zero)
    train, test = _by_type(zero.train), _by_type(zero.test)
    metal = {k: v for k, v in _by_type(index.refs).items() if k[0] == "metal"}
    assert metal and not any(k[0] == "metal" for k in train)  # no metal defect trains
    for key, ids in metal.items():
        assert test[key] == ids  # every one of them tests
    # the other product's split is the protocol's own, untouched
    assert train == {k: v for k, v in _by_type(plain.train).items() if k[0] == "fabric"}
    assert {r.image_path for r in zero.train if r.is_good} == {r.image_path for r in plain.train if r.is_good}


def test_zero_shot_names_an_unknown_product(synth_root):
    index = scan_dataset(synth_root)
    with pytest.raises(DataError, match=r"data.split.zero_shot: \['metl'\] not a product .*fabric.*metal"):
        make_split(index, SplitConfig(zero_shot=["metl"]))
    # a product of the dataset that this run did not select is not an error (a per-product index)
    make_split(scan_dataset(synth_root, ["fabric"]), SplitConfig(zero_shot=["metal"]))
