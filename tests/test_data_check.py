"""``data check``: every bad sample and every unknown folder in ONE report, with its path.

Why these matter: preparing a real dataset means fixing all its problems before a long run; a
checker that stops at the first file, or that names no file, costs a round trip per problem. And
a problem that is not reported is a sample that is silently mislabeled or silently dropped.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.cli import main
from defectforge.data.check import check_dataset

MT_CLASSES = ("blowhole", "break", "crack", "fray", "uneven")
MT_COUNTS = {("train", "good"): 200, ("test", "good"): 50, ("test", "blowhole"): 115, ("test", "break"): 85,
             ("test", "crack"): 57, ("test", "fray"): 32, ("test", "uneven"): 97}


def _writable_copy(src: Path, dst: Path) -> Path:
    """copytree keeps the source's (read-only) permissions; make the copy editable."""
    shutil.copytree(src, dst)
    for dirpath, dirnames, filenames in os.walk(dst):
        for name in [*dirnames, *filenames, ""]:
            p = Path(dirpath, name)
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dst


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ------------------------------------------------------------------------- the real dataset
def test_magnetic_tile_checks_clean(magnetic_tile, capsys):
    assert main(["data", "check", str(magnetic_tile)]) == 0
    out = capsys.readouterr().out
    assert f"product magnetic_tile: 5 defect types ({', '.join(MT_CLASSES)}); grayscale" in out
    assert "636 images, 0 bad samples, 0 structural issues" in out

    report = check_dataset(magnetic_tile)
    assert report.ok and report.bad == []
    assert report.classes == {"magnetic_tile": MT_CLASSES}
    assert report.counts["magnetic_tile"] == MT_COUNTS
    assert report.is_grayscale("magnetic_tile")
    assert set(report.sizes["magnetic_tile"]) == {(256, 256)}


def test_broken_magnetic_tile_copy_names_all_three_files(magnetic_tile, tmp_path, capsys):
    copy = _writable_copy(magnetic_tile, tmp_path / "magnetic_tile")  # product = folder name
    truncated = copy / "test" / "crack" / "005.png"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    wrong_size = copy / "ground_truth" / "break" / "010_mask.png"
    small = np.zeros((128, 128), np.uint8)
    small[40:60, 40:60] = 255
    _save(wrong_size, small)
    empty = copy / "ground_truth" / "fray" / "003_mask.png"
    _save(empty, np.zeros((256, 256), np.uint8))

    assert main(["data", "check", str(copy)]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "636 images, 3 bad samples, 0 structural issues" in out
    assert f"{truncated}: cannot decode image" in out
    assert f"{wrong_size}: mask size 128x128 differs from its image 010.png (256x256)" in out
    assert f"{empty}: empty defect mask" in out
    assert "3 problem(s)" in captured.err

    assert main(["data", "check", str(copy), "--on-bad-sample", "skip"]) == 0
    out = capsys.readouterr().out
    assert "3 skipped" in out
    for path in (truncated, wrong_size, empty):
        assert str(path) in out  # skip mode still lists them

    report = check_dataset(copy, on_bad_sample="skip")
    assert report.skipped == 3 and report.n_bad_samples == 3
    assert report.bad_counts["magnetic_tile"] == {("test", "crack"): 1, ("test", "break"): 1,
                                                  ("test", "fray"): 1}
    assert report.counts["magnetic_tile"] == MT_COUNTS  # bad samples are still counted as found


# ----------------------------------------------------------------- synthetic-tree problems
@pytest.fixture
def broken_synth(synth_root, tmp_path) -> tuple[Path, dict[Path, str]]:
    """A copy of the synthetic dataset with three bad samples and four unknown folders;
    returns (root, {path: the reason text expected next to it})."""
    root = _writable_copy(synth_root, tmp_path / "data")
    fab, met = root / "fabric", root / "metal"
    missing = fab / "ground_truth" / "hole" / "003_mask.png"
    missing.unlink()

    seven = fab / "ground_truth" / "scratch" / "004_mask.png"
    m = np.asarray(Image.open(seven)).copy()
    m[m == 255] = 7  # K = 3: neither 0/255 nor a known class id
    _save(seven, m)

    blurred = met / "ground_truth" / "stain" / "002_mask.png"
    m = np.asarray(Image.open(blurred)).copy()
    edge = np.argwhere(m == 255)[0]
    m[tuple(edge)] = 128  # one anti-aliased pixel makes it neither binary nor class ids
    _save(blurred, m)

    (root / "junk").mkdir()
    (fab / "validation").mkdir()
    _save(fab / "train" / "bad" / "000.png", np.zeros((64, 64, 3), np.uint8))
    _save(fab / "ground_truth" / "dent" / "000_mask.png", np.zeros((64, 64), np.uint8))
    expected = {
        missing: "mask file not found",
        seven: "mask values {0, 7} are neither 0/255 nor known class ids (0..3",
        blurred: "mask values {0, 128, 255} are neither 0/255 nor known class ids",
        root / "junk": "is not a product",
        fab / "validation": "unexpected folder in product 'fabric'",
        fab / "train" / "bad": "unexpected folder under train/",
        fab / "ground_truth" / "dent": "has no matching test/dent folder",
    }
    return root, expected


def test_synthetic_problems_all_in_one_report(broken_synth, capsys):
    root, expected = broken_synth
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    problems = out.split("problems:\n", 1)[1].splitlines()
    assert len(problems) == len(expected)
    for path, reason in expected.items():
        assert any(line.strip().startswith(f"{path}: ") and reason in line for line in problems), (path, out)
    assert "3 bad samples, 4 structural issues" in out
    # the counts table still shows what was found, with the bad ones per (split, defect)
    rows = {tuple(ln.split()[:3]): ln.split()[3:] for ln in out.splitlines() if ln.startswith("  fabric ")}
    assert rows[("fabric", "test", "hole")] == ["1", "12", "1"]
    assert rows[("fabric", "test", "scratch")] == ["2", "12", "1"]
    assert rows[("fabric", "test", "stain")] == ["3", "12", "0"]


def test_synthetic_problems_skip_mode(broken_synth, capsys):
    root, expected = broken_synth
    assert main(["data", "check", str(root), "--on-bad-sample", "skip"]) == 0
    out = capsys.readouterr().out
    assert "3 skipped" in out
    report = check_dataset(root, on_bad_sample="skip")
    assert report.ok and report.skipped == 3
    assert {p for p, _ in report.bad} == set(expected)


def test_check_of_one_product(broken_synth, capsys):
    root, _ = broken_synth
    assert main(["data", "check", str(root), "--products", "metal"]) == 1
    out = capsys.readouterr().out
    assert "product metal:" in out and "product fabric:" not in out
    assert "1 bad samples, 0 structural issues" in out


def test_classes_without_images_are_listed_with_zero(synth_root, tmp_path):
    pdir = _writable_copy(synth_root / "metal", tmp_path / "metal")
    (pdir / "classes.json").write_text('{"classes": ["hole", "scratch", "stain", "dent"]}')
    report = check_dataset(pdir)
    assert report.ok
    assert report.counts["metal"][("test", "dent")] == 0
    assert ["metal", "test", "dent", "4", "0", "0"] in [ln.split() for ln in report.format().splitlines()]


def test_dataset_level_errors_exit_2_naming_the_path(tmp_path, synth_root, capsys):
    missing = tmp_path / "nowhere"
    assert main(["data", "check", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["data", "check", str(synth_root), "--products", "glass"]) == 2
    assert "'glass'" in capsys.readouterr().err


def test_training_data_names_every_bad_sample_or_skips_them_when_told(synth_root, tmp_path, capsys):
    """The generator's loader (train/data.py) follows data.on_bad_sample like ``data check``: one
    error naming every bad training sample, or those samples left out, counted and listed."""
    from defectforge.config import resolve_config
    from defectforge.data.mvtec import DataError, scan_dataset
    from defectforge.data.splits import make_split
    from defectforge.train.data import load_training_data

    copy = _writable_copy(synth_root, tmp_path / "data")
    index = scan_dataset(copy)
    product = index.products[0]
    base = [f"data.path={copy}", f"data.products=[{product}]"]
    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=base)
    train_side = [r for r in make_split(scan_dataset(copy, [product]), cfg.data.split).train if not r.is_good]
    defective = [r.image_path for r in train_side[:2]]  # two defect images the generator trains on
    for path in defective:
        path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DataError) as err:
        load_training_data(resolve_config(method="defect-gen", preset="tiny", overrides=base))
    assert "2 bad sample(s)" in str(err.value)
    for path in defective:
        assert str(path) in str(err.value)

    data = load_training_data(resolve_config(method="defect-gen", preset="tiny",
                                             overrides=[*base, "data.on_bad_sample=skip"]))
    assert sorted(p for p, _ in data.skipped) == sorted(str(p) for p in defective)
    assert "[data] skipped 2 bad sample(s)" in capsys.readouterr().out
    assert len(data.rows) == len([r for r in make_split(scan_dataset(copy, [product]), cfg.data.split).train
                                  if not r.is_good or cfg.data.train_on_good]) - 2
