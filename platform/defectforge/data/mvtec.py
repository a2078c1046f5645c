"""MVTec AD layout reader: scan a folder into a ``DatasetIndex`` and decode samples into rows.

Layout (one folder per product, or ``root`` itself is a single product folder)::

    <product>/train/good/<id>.png
    <product>/test/good/<id>.png
    <product>/test/<defect>/<id>.png
    <product>/ground_truth/<defect>/<id>_mask.png     (0/255 binary, or class ids 0..K)
    <product>/classes.json                            (optional: {"classes": [defect, ...]})

Why scanning and decoding are separate: scanning is cheap and tells the splits which samples exist;
decoding is where bad files show up, and ``data check`` wants every bad file, not the first one.
Structural oddities the scan can step over (a stray folder, a mask without an image) are recorded
in ``DatasetIndex.issues`` rather than raised, so training still runs and ``data check`` reports them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from defectforge.data.sample import (
    GOOD,
    IMAGE_EXTS,
    BadSampleError,
    DataError,
    DatasetIndex,
    SampleRef,
    id_sort_key,
)
from defectforge.paths import is_regular_file, non_regular_kind, unsafe_reason

PRODUCT_PARTS = ("train", "test", "ground_truth")
Issue = tuple[Path, str]


# ------------------------------------------------------------------------------------- scanning
def scan_dataset(root: str | Path, products: list[str] | None = None) -> DatasetIndex:
    """Index an MVTec-layout dataset. ``products`` selects (and orders) products; None = all.

    Raises ``DataError`` for what makes the dataset unusable: a missing root, no product folders,
    an unknown product name, a product without any image, a bad ``classes.json``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    issues: list[Issue] = []
    if _is_product_dir(root):
        product_dirs = {root.resolve().name: root}
    else:
        product_dirs = {}
        for child in _subdirs(root):
            if _is_product_dir(child):
                product_dirs[child.name] = child
            elif products is None:
                issues.append((child, "folder has no train/ or test/ inside, so it is not a product "
                                      "(expected <product>/train/good and <product>/test/<defect>)"))
        if not product_dirs:
            raise DataError(f"{root}: no product folders found (expected <product>/train/good and "
                            f"<product>/test/<defect>, or a single product folder with train/ and test/)")
    if products is not None:
        unknown = [p for p in products if p not in product_dirs]
        if unknown:
            raise DataError(f"{root}: unknown product(s) {', '.join(map(repr, unknown))}; "
                            f"found: {', '.join(sorted(product_dirs))}")
        product_dirs = {p: product_dirs[p] for p in products}

    classes: dict[str, tuple[str, ...]] = {}
    refs: list[SampleRef] = []
    for name, pdir in product_dirs.items():
        p_classes, p_refs, p_issues = _scan_product(name, pdir)
        classes[name] = p_classes
        refs.extend(p_refs)
        issues.extend(p_issues)
    return DatasetIndex(root=root, products=list(product_dirs), classes=classes, refs=refs,
                        issues=issues, product_dirs=dict(product_dirs))


def _is_product_dir(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(folder: Path, issues: list[Issue]) -> dict[str, Path]:
    """{id: image path} of one image folder; other files and duplicate ids become issues."""
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            issues.append((path, "unexpected folder inside an image folder"))
        elif not is_regular_file(path):  # a FIFO named x.png would block the decoder forever
            issues.append((path, f"not a regular file ({non_regular_kind(path)}); skipped, never opened"))
        elif path.suffix.lower() not in IMAGE_EXTS:
            issues.append((path, f"not an image file (accepted: {', '.join(IMAGE_EXTS)})"))
        elif path.stem in images:
            issues.append((path, f"two images with id {path.stem!r} (also {images[path.stem].name}); "
                                 f"using {images[path.stem].name}"))
        else:
            images[path.stem] = path
    if not images:
        issues.append((folder, "empty folder: no images"))
    return dict(sorted(images.items(), key=lambda kv: id_sort_key(kv[0])))


def _scan_product(name: str, pdir: Path) -> tuple[tuple[str, ...], list[SampleRef], list[Issue]]:
    issues: list[Issue] = []
    for child in _subdirs(pdir):
        if child.name not in PRODUCT_PARTS:
            issues.append((child, f"unexpected folder in product {name!r} (expected train/, test/, ground_truth/)"))

    refs: list[SampleRef] = []
    train = pdir / "train"
    if train.is_dir():
        for child in _subdirs(train):
            if child.name != GOOD:
                issues.append((child, "unexpected folder under train/ (the MVTec layout trains on good/ only)"))
        if (train / GOOD).is_dir():
            for sid, path in _list_images(train / GOOD, issues).items():
                refs.append(SampleRef(name, GOOD, sid, "train", path, None))

    test = pdir / "test"
    defect_dirs = [d for d in _subdirs(test) if d.name != GOOD] if test.is_dir() else []
    if (test / GOOD).is_dir():
        for sid, path in _list_images(test / GOOD, issues).items():
            refs.append(SampleRef(name, GOOD, sid, "test", path, None))

    gt = pdir / "ground_truth"
    defect_names = [d.name for d in defect_dirs]
    if gt.is_dir():
        for child in _subdirs(gt):
            if child.name not in defect_names:
                issues.append((child, f"ground_truth/{child.name} has no matching test/{child.name} folder"))
    for ddir in defect_dirs:
        images = _list_images(ddir, issues)
        masks = _list_masks(gt / ddir.name, images, issues)
        for sid, path in images.items():
            mask = masks.get(sid, gt / ddir.name / f"{sid}_mask.png")
            refs.append(SampleRef(name, ddir.name, sid, "test", path, mask))

    if not refs:
        raise DataError(f"{pdir}: product {name!r} has no images (expected train/good/*.png and "
                        f"test/<defect>/*.png)")
    return _product_classes(pdir, defect_names), refs, issues


def _list_masks(folder: Path, images: dict[str, Path], issues: list[Issue]) -> dict[str, Path]:
    """{image id: mask path}; masks are ``<id>_mask.<ext>`` (MVTec) or ``<id>.<ext>``."""
    masks: dict[str, Path] = {}
    if not folder.is_dir():
        return masks
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not is_regular_file(path):
            issues.append((path, f"not a regular file ({non_regular_kind(path)}); skipped, never opened"))
            continue
        stem = path.stem
        sid = stem[: -len("_mask")] if stem.endswith("_mask") else stem
        if path.suffix.lower() not in IMAGE_EXTS:
            issues.append((path, "not an image file in a ground_truth folder"))
        elif sid not in images:
            issues.append((path, f"mask without an image (expected test/{folder.name}/{sid}.png)"))
        elif sid in masks:
            issues.append((path, f"two masks for image {sid!r} (also {masks[sid].name})"))
        else:
            masks[sid] = path
    return masks


def _product_classes(pdir: Path, defect_names: list[str]) -> tuple[str, ...]:
    """Class-id order: ``classes.json`` when present (so ids stay stable when folders come and go),
    else the sorted defect folder names."""
    cfile = pdir / "classes.json"
    if cfile.exists() and not is_regular_file(cfile):
        raise DataError(f"{cfile}: not a regular file ({non_regular_kind(cfile)}); refusing to open it")
    if not cfile.is_file():
        return tuple(sorted(defect_names))
    try:
        data = json.loads(cfile.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{cfile}: not readable JSON ({exc})") from None
    names = data.get("classes") if isinstance(data, dict) else None
    if (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names) or GOOD in names):
        raise DataError(f"{cfile}: field 'classes' must be a list of unique defect names (not 'good')")
    for n in names:  # defect names become folder names of generated data and reports
        if (why := unsafe_reason(n)) is not None:
            raise DataError(f"{cfile}: field 'classes' holds defect name {n!r} that {why}; each name must "
                            "be a single folder name (no '/', '\\', '..')")
    missing = [d for d in defect_names if d not in names]
    if missing:
        raise DataError(f"{cfile}: field 'classes' lacks defect folder(s) {', '.join(missing)} "
                        f"found under {pdir / 'test'}")
    if len(names) > 255:
        raise DataError(f"{cfile}: {len(names)} classes do not fit a uint8 mask")
    return tuple(names)


# ------------------------------------------------------------------------------------- decoding
@dataclass
class NativeSample:
    """A decoded sample at its stored size, before resizing. ``mode`` is the image's PIL mode."""

    image: np.ndarray  # uint8 HxWx3
    mask: np.ndarray   # uint8 HxW of class ids
    mode: str


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def read_image(path: Path) -> tuple[np.ndarray, str]:
    """Fully decode an image to uint8 HxWx3 (grayscale repeated to 3 channels); returns (array, mode).

    ``Image.open`` only reads the header; ``load()`` forces the full decode so a truncated file
    fails here, naming the file, and not later inside a training step.
    """
    if not is_regular_file(path):
        raise BadSampleError(path, f"not a regular file ({non_regular_kind(path)}); never opened")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode.startswith("I;16") or mode == "I":
                # 16-bit grayscale: scale to 8 bit rather than let convert() clip at 255.
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
                return np.repeat(arr[:, :, None], 3, axis=2), mode
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except _DECODE_ERRORS as exc:
        raise BadSampleError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from None
    return rgb, mode


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask file to its raw 2-D integer values (no thresholding, no class mapping)."""
    if path.exists() and not is_regular_file(path):
        raise BadSampleError(path, f"not a regular file ({non_regular_kind(path)}); never opened")
    if not path.is_file():
        raise BadSampleError(path, "mask file not found for a defect image")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                return np.asarray(im, dtype=np.uint8) * 255
            if im.mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise BadSampleError(path, "colour mask: expected a single-channel mask of 0/255 or class ids")
                return rgb[..., 0]
            if im.mode == "LA":
                return np.asarray(im.getchannel("L"))
            return np.asarray(im)  # L (0..255), P (palette indices = class ids), I;16
    except _DECODE_ERRORS as exc:
        raise BadSampleError(path, f"cannot decode mask ({type(exc).__name__}: {exc})") from None


def mask_to_class_ids(raw: np.ndarray, class_id: int, n_classes: int, path: Path) -> np.ndarray:
    """Turn a raw mask into class ids: 0/255 -> {0, class_id}; values in 0..K are taken as-is.

    Checked in this order because a 0/255 mask is the MVTec convention, and a Defect-Spectrum-style
    mask holds the class ids of the product directly (possibly several defect types in one image).
    """
    values = np.unique(raw)
    if values.max(initial=0) == 0:
        raise BadSampleError(path, "empty defect mask (all pixels 0)")
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    if set(values.tolist()) <= {0, 255}:
        return np.where(raw == 255, class_id, 0).astype(np.uint8)
    if values.max() <= n_classes:
        if class_id not in values:
            # e.g. a 0/1 binary mask in the folder of class 3 would silently become class 1
            raise BadSampleError(path, f"class-id mask values {{{shown}}} lack this folder's class id "
                                       f"{class_id}; a binary mask must be 0/255")
        return raw.astype(np.uint8)
    raise BadSampleError(path, f"mask values {{{shown}}} are neither 0/255 nor known class ids "
                               f"(0..{n_classes} for this product)")


def read_native(ref: SampleRef, classes: tuple[str, ...]) -> NativeSample:
    """Decode and validate one sample at its stored size (all checks of ``load_sample``)."""
    image, mode = read_image(ref.image_path)
    h, w = image.shape[:2]
    if ref.is_good:
        return NativeSample(image, np.zeros((h, w), np.uint8), mode)
    if ref.defect not in classes:
        raise BadSampleError(ref.image_path, f"defect {ref.defect!r} is not among the product's classes {classes}")
    if ref.mask_path is None:
        raise BadSampleError(ref.image_path, "defect image has no mask")
    raw = read_mask(ref.mask_path)
    if raw.shape != (h, w):
        raise BadSampleError(ref.mask_path, f"mask size {raw.shape[1]}x{raw.shape[0]} differs from its "
                                            f"image {ref.image_path.name} ({w}x{h})")
    mask = mask_to_class_ids(raw, classes.index(ref.defect) + 1, len(classes), ref.mask_path)
    return NativeSample(image, mask, mode)


def resize_pair(image: np.ndarray, mask: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``resolution`` square. Images: PIL BILINEAR, because Pillow widens the filter by
    the scale factor when downscaling (an antialiased, area-like average, unlike torch/OpenCV
    bilinear) and interpolates smoothly when upscaling. Masks: NEAREST, so class ids stay ids."""
    size = (resolution, resolution)
    if image.shape[:2] != (resolution, resolution):
        image = np.asarray(Image.fromarray(image, "RGB").resize(size, Image.Resampling.BILINEAR))
    if mask.shape != (resolution, resolution):
        mask = np.asarray(Image.fromarray(mask, "L").resize(size, Image.Resampling.NEAREST))
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def load_sample(ref: SampleRef, classes: tuple[str, ...], resolution: int) -> dict:
    """One sample row (DESIGN.md contract) at ``resolution`` x ``resolution``.

    Raises ``BadSampleError`` naming the file for an undecodable image, a missing mask, a mask whose
    size differs from its image (checked before resizing), an empty mask, or invalid mask values.
    """
    native = read_native(ref, classes)
    image, mask = resize_pair(native.image, native.mask, resolution)
    return dict(image=image, mask=mask, product=ref.product, defect=ref.defect, id=ref.id, split=ref.split)


def load_rows(
    index: DatasetIndex,
    refs: Iterable[SampleRef] | None,
    resolution: int,
    on_bad_sample: str = "error",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Decode many refs into rows; returns (rows, bad). ``error`` raises one ``DataError`` listing
    *every* bad sample; ``skip`` leaves them out and returns them in ``bad``."""
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample must be 'error' or 'skip', not {on_bad_sample!r}")
    refs = list(index.refs if refs is None else refs)
    rows: list[dict] = []
    bad: list[tuple[Path, str]] = []
    for i, ref in enumerate(refs):
        try:
            rows.append(load_sample(ref, index.classes[ref.product], resolution))
        except BadSampleError as exc:
            bad.append((exc.path, exc.reason))
        if progress is not None:
            progress(i + 1, len(refs))
    if bad and on_bad_sample == "error":
        listing = "\n".join(f"  {p}: {why}" for p, why in bad)
        raise DataError(f"{len(bad)} bad sample(s) in {index.root} (use on_bad_sample=skip to leave "
                        f"them out):\n{listing}")
    return rows, bad
