"""Shared vocabulary of the data layer: errors, sample references and the dataset index.

Why a separate module: the reader (``mvtec.py``), the checker, the splits and the Arrow export all
speak of the same ``SampleRef`` and raise the same errors, and none of them should import the
others just to get a dataclass.

A ``SampleRef`` points at files; it holds no pixels. Pixels are decoded on demand by
``mvtec.load_sample`` into a *sample row* (the contract in DESIGN.md)::

    dict(image=uint8 HxWx3, mask=uint8 HxW of class ids, product=str, defect=str, id=str, split=str)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Image files the readers accept; anything else inside an image folder is reported.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


from defectforge.errors import DataError  # noqa: E402  (re-exported: ``data.sample.DataError``)


class BadSampleError(DataError):
    """One sample that cannot be used: undecodable image, missing/mismatched/empty/invalid mask.

    ``path`` is the offending file (the image or the mask), ``reason`` says what is wrong with it.
    """

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def id_sort_key(sample_id: str) -> tuple:
    """Sort key that orders numeric ids numerically ("2" < "10") and puts other ids after them.

    Why: the few-shot protocols ("lowest third of ids", "first k") are defined on numeric order,
    and MVTec-style ids are zero-padded numbers but need not be.
    """
    if sample_id.isdigit():
        return (0, int(sample_id), sample_id)
    return (1, 0, sample_id)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives. ``split`` is the folder it was found in (train/ or test/) until a
    few-shot split re-assigns it (see ``splits.py``); ``mask_path`` is None for good images and,
    for a defect image, the mask file that should exist (it may be missing: ``load_sample`` says so).
    """

    product: str
    defect: str
    id: str
    split: str
    image_path: Path
    mask_path: Path | None = None

    @property
    def is_good(self) -> bool:
        return self.defect == GOOD


@dataclass
class DatasetIndex:
    """Every sample reference of a dataset, and each product's defect classes in class-id order.

    ``classes[product][i - 1]`` is the defect type with mask value ``i``. ``issues`` holds the
    structural problems the scan noticed but could step over (stray folders, orphan masks, ...);
    ``data check`` reports them, training ignores them. ``product_dirs`` maps product -> folder.
    """

    root: Path
    products: list[str]
    classes: dict[str, tuple[str, ...]]
    refs: list[SampleRef]
    issues: list[tuple[Path, str]] = field(default_factory=list)
    product_dirs: dict[str, Path] = field(default_factory=dict)

    def for_product(self, product: str) -> DatasetIndex:
        if product not in self.classes:
            raise DataError(f"{self.root}: unknown product {product!r}; known: {', '.join(self.products)}")
        pdir = self.product_dirs.get(product)
        return DatasetIndex(
            root=self.root,
            products=[product],
            classes={product: self.classes[product]},
            refs=[r for r in self.refs if r.product == product],
            issues=[(p, why) for p, why in self.issues if pdir is None or _is_under(p, pdir)],
            product_dirs={product: pdir} if pdir is not None else {},
        )

    def defect_refs(self, product: str | None = None) -> list[SampleRef]:
        return [r for r in self.refs if not r.is_good and (product is None or r.product == product)]

    def good_refs(self, split: str | None = None) -> list[SampleRef]:
        return [r for r in self.refs if r.is_good and (split is None or r.split == split)]

    def class_id(self, product: str, defect: str) -> int:
        """Mask value of ``defect`` in ``product`` (0 for good)."""
        if defect == GOOD:
            return 0
        try:
            return self.classes[product].index(defect) + 1
        except (KeyError, ValueError):
            raise DataError(f"{self.root}: {product!r} has no defect class {defect!r}") from None


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False
