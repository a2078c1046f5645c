"""Few-shot split protocols: which defective images a generator may learn from, which are held out.

Why protocols with names: the papers differ here, and the differences matter. Defect-Gen and
AnomalyDiffusion train on the lowest third of ids; the AnomalyDiffusion code's split overlaps its
test set by one image, and on datasets that photograph one object several times (the magnetic
tiles: ~6 exposures per tile) an id-based cut leaks the same object into both sides. So:

* ``lowest-third``: ids sorted numerically, the first floor(n/3) train;
* ``first-k``: the first ``k`` ids train;
* ``half``: a seeded random half trains;
* ``group``: whole groups (a metadata column) train, seeded, until ``train_fraction`` of the images
  is reached, so no group is on both sides.
* ``manifest``: bring your own split, a CSV ``product,defect,id,side`` (``side`` train or test),
  e.g. the split a paper published or one a customer agreed to. Every defective image of the
  selected products must be on exactly one side and every row must name an existing image; each
  violation is a ``DataError`` naming the file, the line and what is wrong, because a silently
  dropped or misspelt row would change the experiment without anyone noticing.
* ``all``: every defective image trains (a customer's handful of images, all needed to learn
  from). The test side then holds only ``test/good``, so test-based evaluation of defects
  (segmentation, memorisation baseline) is undefined; see ``evaluate/run.py``.
* ``zero_shot`` (beside any protocol): the listed products' defective images are all on the test
  side (DefectDiffu's zero-shot generation: their defects are learned from the other products).

Each applies per (product, defect type). Defect-free images keep their folder: ``train/good``
trains, ``test/good`` tests. Every manifest is checked for disjointness when it is built (by image
file, and by group for ``group``); a violation is a ``DataError``, never a silent leak.
"""

from __future__ import annotations

import csv
import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from defectforge.data.sample import GOOD, DataError, DatasetIndex, SampleRef, id_sort_key


@dataclass
class SplitManifest:
    """The refs on each side of a split; construction asserts the sides are disjoint."""

    protocol: str
    seed: int
    train: list[SampleRef]
    test: list[SampleRef]
    groups: dict[Path, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = {r.image_path for r in self.train} & {r.image_path for r in self.test}
        if both:
            raise DataError(f"split {self.protocol}: {len(both)} image(s) on both sides, e.g. {sorted(both)[0]}")
        if self.groups:
            g_train = {self.groups[r.image_path] for r in self.train if r.image_path in self.groups}
            g_test = {self.groups[r.image_path] for r in self.test if r.image_path in self.groups}
            shared = g_train & g_test
            if shared:
                raise DataError(f"split {self.protocol}: group(s) {sorted(shared)[:5]} on both sides")

    def ids(self, split: str) -> dict[str, list[str]]:
        """``{"product/defect": [ids]}`` of one side (defect-free images as ``product/good``)."""
        out: dict[str, list[str]] = defaultdict(list)
        for r in getattr(self, split):
            out[f"{r.product}/{r.defect}"].append(r.id)
        return {k: sorted(v, key=id_sort_key) for k, v in sorted(out.items())}

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "seed": self.seed, "train": self.ids("train"), "test": self.ids("test"),
                "n_train": len(self.train), "n_test": len(self.test)}


def _rng(seed: int, *keys: str) -> np.random.Generator:
    # crc32 rather than hash(): stable across processes (PYTHONHASHSEED) and machines.
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def read_groups(index: DatasetIndex, metadata: str | Path | None, column: str) -> dict[Path, str]:
    """Group of every defective image from a metadata CSV with columns ``cls``, ``id``, ``column``
    (and ``product`` when the root holds several products). Looks in ``metadata``, else
    ``<root>/metadata.csv``, else each ``<product>/metadata.csv``."""
    files: list[tuple[Path, str | None]] = []
    if metadata:
        files = [(Path(metadata), None)]
    elif (index.root / "metadata.csv").is_file():
        files = [(index.root / "metadata.csv", None)]
    else:
        files = [(d / "metadata.csv", p) for p, d in index.product_dirs.items() if (d / "metadata.csv").is_file()]
    if not files:
        raise DataError(f"{index.root}: the group split needs a metadata CSV (columns cls, id, {column}); "
                        "none found: set data.split.metadata")
    # a set per key: a file without a product column over several products (or a duplicated row)
    # can give one image two groups, and picking either could leak a part across the cut
    table: dict[tuple[str | None, str, str], set[str]] = defaultdict(set)
    sources: dict[tuple[str | None, str, str], set[Path]] = defaultdict(set)
    for path, product in files:
        if not path.is_file():
            raise DataError(f"group split: metadata file not found: {path}")
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"cls", "id", column} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: missing column(s) {sorted(missing)} (data.split.group_column={column!r})")
            for row in reader:
                key = (row.get("product") or product, row["cls"], row["id"])
                table[key].add(row[column])
                sources[key].add(path)
    groups = {}
    for ref in index.defect_refs():
        for key in ((ref.product, ref.defect, ref.id), (None, ref.defect, ref.id)):
            if key in table:
                if len(table[key]) > 1:
                    raise DataError(f"group split: {ref.image_path} has {len(table[key])} different "
                                    f"{column!r} values {sorted(table[key])} in "
                                    f"{', '.join(map(str, sorted(sources[key])))} (cls={ref.defect!r}, "
                                    f"id={ref.id!r}); add a 'product' column when the dataset holds "
                                    "several products")
                groups[ref.image_path] = next(iter(table[key]))
                break
        else:
            raise DataError(f"group split: {ref.image_path} has no row in the metadata "
                            f"(looked up cls={ref.defect!r}, id={ref.id!r})")
    return groups


MANIFEST_COLUMNS = ("product", "defect", "id", "side")
SIDES = ("train", "test")


def read_manifest(index: DatasetIndex, path: str | Path) -> dict[Path, str]:
    """Side (``train``/``test``) of every defective image of ``index`` from a split CSV.

    Columns ``product,defect,id,side`` (others are ignored). Rows of a product that exists next to
    the selected ones but is not selected are skipped, so one manifest serves any product
    selection. Every other row must name a defective image of the dataset, once per side; every
    defective image must be listed, and every defect type needs a training image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split manifest not found: {path} (data.split.manifest)")
    by_key = {(r.product, r.defect, r.id): r for r in index.defect_refs()}
    sides: dict[Path, tuple[str, int]] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in MANIFEST_COLUMNS if c not in fields]
        if missing:
            raise DataError(f"{path}: split manifest is missing column(s) {missing}; it needs "
                            f"{','.join(MANIFEST_COLUMNS)} (found {fields or 'no header'})")
        reader.fieldnames = fields
        for row in reader:
            line = reader.line_num
            where = f"{path}, line {line}"
            vals = {c: (row.get(c) or "").strip() for c in MANIFEST_COLUMNS}
            if not all(vals.values()):
                raise DataError(f"{where}: empty {[c for c in MANIFEST_COLUMNS if not vals[c]]} in {dict(row)}")
            product, defect, sid, side = (vals[c] for c in MANIFEST_COLUMNS)
            if side.lower() not in SIDES:
                raise DataError(f"{where}: side {side!r} is neither 'train' nor 'test' ({product}/{defect}/{sid})")
            side = side.lower()
            if product not in index.classes:
                if _is_other_product(index, product):
                    continue  # a product of the dataset this run did not select
                raise DataError(f"{where}: product {product!r} is not in the dataset {index.root} "
                                f"(products: {', '.join(index.products)})")
            if defect == GOOD:
                raise DataError(f"{where}: {product}/good/{sid}: defect-free images keep their folder "
                                "(train/good trains, test/good tests); list defective images only")
            if defect not in index.classes[product]:
                raise DataError(f"{where}: {product!r} has no defect type {defect!r} "
                                f"(types: {', '.join(index.classes[product])})")
            ref = by_key.get((product, defect, sid))
            if ref is None:
                known = sorted((r.id for r in index.defect_refs(product) if r.defect == defect), key=id_sort_key)
                raise DataError(f"{where}: no image {product}/{defect} with id {sid!r} in the dataset {index.root} "
                                f"(ids there: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''})")
            if ref.image_path in sides and sides[ref.image_path][0] != side:
                other_side, other_line = sides[ref.image_path]
                raise DataError(f"{where}: {product}/{defect}/{sid} is on both sides ({other_side} at line "
                                f"{other_line}, {side} here)")
            sides.setdefault(ref.image_path, (side, line))
    unlisted = [r for r in index.defect_refs() if r.image_path not in sides]
    if unlisted:
        names = ", ".join(f"{r.product}/{r.defect}/{r.id}" for r in unlisted[:5])
        raise DataError(f"{path}: {len(unlisted)} defective image(s) of the dataset are not in the split "
                        f"manifest, e.g. {names}; give each a row with side train or test")
    trained = {(r.product, r.defect) for r in index.defect_refs() if sides[r.image_path][0] == "train"}
    for product, classes in index.classes.items():
        for defect in classes:
            if (product, defect) not in trained and any(r.defect == defect for r in index.defect_refs(product)):
                raise DataError(f"{path}: {product}/{defect} has no image on the train side; a generator "
                                "cannot learn a defect type it never sees")
    return {p: side for p, (side, _) in sides.items()}


def _is_other_product(index: DatasetIndex, product: str) -> bool:
    """Whether ``product`` is a product folder of the dataset root that this index did not select."""
    folder = index.root / product
    return folder.is_dir() and ((folder / "train").is_dir() or (folder / "test").is_dir())


def _split_one(refs: list[SampleRef], cfg: Any, groups: dict[Path, str]) -> tuple[list[SampleRef], list[SampleRef]]:
    refs = sorted(refs, key=lambda r: id_sort_key(r.id))
    n, where = len(refs), f"{refs[0].product}/{refs[0].defect}"
    if cfg.protocol == "lowest-third":
        k = n // 3
    elif cfg.protocol == "first-k":
        k = cfg.k
    elif cfg.protocol == "half":
        order = _rng(cfg.seed, where).permutation(n)
        k = n // 2
        refs = [refs[i] for i in order]
    else:  # group
        names = sorted({groups[r.image_path] for r in refs})
        order = _rng(cfg.seed, where).permutation(len(names))
        target, chosen, count = cfg.train_fraction * n, set(), 0
        sizes = {g: sum(groups[r.image_path] == g for r in refs) for g in names}
        for i in order:
            if count >= target or (len(chosen) == len(names) - 1 and len(names) > 1):
                break
            chosen.add(names[i])
            count += sizes[names[i]]
        train = [r for r in refs if groups[r.image_path] in chosen]
        test = [r for r in refs if groups[r.image_path] not in chosen]
        if not train or not test:
            raise DataError(f"group split: {where} has {len(names)} group(s); "
                            "need at least 2 for a train and a test side")
        return train, test
    if k < 1 or k >= n:
        raise DataError(f"{cfg.protocol} split: {where} has {n} defective image(s), which leaves "
                        f"{'no training' if k < 1 else 'no test'} image (k={k})")
    return refs[:k], refs[k:]


def make_split(index: DatasetIndex, cfg: Any) -> SplitManifest:
    """Apply ``cfg`` (a ``SplitConfig``) to every (product, defect) of ``index``."""
    groups = read_groups(index, cfg.metadata, cfg.group_column) if cfg.protocol == "group" else {}
    by_type: dict[tuple[str, str], list[SampleRef]] = defaultdict(list)
    for ref in index.defect_refs():
        by_type[(ref.product, ref.defect)].append(ref)
    train = [r for r in index.good_refs("train")]
    test = [r for r in index.good_refs("test")]
    sides = read_manifest(index, cfg.manifest) if cfg.protocol == "manifest" else {}
    zero_shot = set(cfg.zero_shot)
    unknown = sorted(p for p in zero_shot if p not in index.products and not _is_other_product(index, p))
    if unknown:
        raise DataError(f"data.split.zero_shot: {unknown} not a product of {index.root} "
                        f"(products: {sorted(index.products)})")
    for key in sorted(by_type):
        refs = sorted(by_type[key], key=lambda r: id_sort_key(r.id))
        if key[0] in zero_shot:  # every defective image of a zero-shot product tests, none trains
            tr, te = [], refs
        elif cfg.protocol == "all":
            tr, te = refs, []
        elif cfg.protocol == "manifest":
            tr = [r for r in refs if sides[r.image_path] == "train"]
            te = [r for r in refs if sides[r.image_path] == "test"]
        else:
            tr, te = _split_one(refs, cfg, groups)
        train.extend(tr)
        test.extend(te)
    # Refs carry the side they are on now (a few-shot training image was found under test/).
    return SplitManifest(cfg.protocol, cfg.seed, [replace(r, split="train") for r in train],
                         [replace(r, split="test") for r in test], groups)


def carve_validation(refs: list[SampleRef], fraction: float, seed: int,
                     groups: dict[Path, str] | None = None) -> tuple[list[SampleRef], list[SampleRef]]:
    """Split training refs into (train, val), seeded and stratified by (product, defect).

    With ``groups`` whole groups move to validation, so validation never shares an object with
    training. Every stratum with >= 2 items (groups) keeps at least one on each side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), not {fraction}")
    strata: dict[tuple[str, str], list[SampleRef]] = defaultdict(list)
    for r in refs:
        strata[(r.product, r.defect)].append(r)
    train, val = [], []
    for key in sorted(strata):
        items = sorted(strata[key], key=lambda r: (id_sort_key(r.id), str(r.image_path)))
        unit = (lambda r: groups[r.image_path]) if groups else (lambda r: str(r.image_path))
        names = sorted({unit(r) for r in items})
        if len(names) < 2:
            train.extend(items)
            continue
        n_val = min(len(names) - 1, max(1, round(fraction * len(names))))
        picked = {names[i] for i in _rng(seed, *key).permutation(len(names))[:n_val]}
        for r in items:
            (val if unit(r) in picked else train).append(r)
    if {r.image_path for r in train} & {r.image_path for r in val}:
        raise DataError("validation carve produced overlapping sides")  # cannot happen; guarded anyway
    return train, val
