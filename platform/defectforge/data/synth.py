"""The built-in procedural dataset: textured products with drawn defects and exact masks.

Why it exists: tests and the laptop default need a dataset that is small, always there, free to
redistribute and whose masks are *exactly* right (a defect pixel is one the drawing changed).
It mimics a real few-shot set: like the magnetic-tile data, each physical "part" (a group) is shot
at two exposures, so a split that ignores groups leaks; ``metadata.csv`` carries the group column.

Products (``products=N`` takes the first N): ``fabric`` (colour weave), ``metal`` (brushed,
saved as 8-bit grayscale to exercise the grayscale path), ``wood`` (grain), ``cap`` (a disc on a
dark background). Defect types differ in shape and appearance:

* ``scratch``: a thin bright slightly bent line;
* ``hole``: a dark round blob with a light rim;
* ``crack``: a dark branching polyline;
* ``stain``: a soft, irregular coloured blob (stronger in the middle, no hard halo).

Shapes are drawn with ``PIL.ImageDraw`` onto a mask; the texture is changed only where the mask is
set (alpha 0 outside), so the mask is the defect, pixel for pixel. Determinism: every image has
its own ``numpy.random.Generator`` seeded from (seed, product, defect, group, exposure) and PNGs
carry no timestamps, so two runs write byte-identical files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

PRODUCTS: dict[str, tuple[str, ...]] = {
    "fabric": ("hole", "scratch", "stain"),
    "metal": ("hole", "scratch", "stain"),
    "wood": ("crack", "hole", "scratch"),
    "cap": ("crack", "scratch", "stain"),
}
GRAYSCALE = {"metal"}
N_TRAIN_GOOD = 40
N_TEST_GOOD = 10
N_PER_DEFECT = 12
EXPOSURES = (0.88, 1.12)  # each group (one physical part) is shot at these gains
_LO, _HI = 40.0, 210.0    # clean textures stay inside this range so every defect stays visible


# ------------------------------------------------------------------------------------- textures
def _smooth_noise(rng: np.random.Generator, size: int, sigma) -> np.ndarray:
    """Zero-mean, unit-std smooth noise (scipy gaussian filter over white noise)."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-8)


def _fabric(rng: np.random.Generator, s: int) -> np.ndarray:
    period = s / 12.0
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    u = xx / period + rng.uniform(0, 1)
    v = yy / period + rng.uniform(0, 1)
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    profile = np.where(over, np.sin(np.pi * (v % 1.0)), np.sin(np.pi * (u % 1.0)))
    shade = 0.55 + 0.35 * profile + 0.04 * _smooth_noise(rng, s, 0.7)
    base = np.array([120.0, 150.0, 200.0]) * rng.uniform(0.92, 1.05, size=3)
    return shade[..., None] * base


def _metal(rng: np.random.Generator, s: int) -> np.ndarray:
    streaks = _smooth_noise(rng, s, (0.6, s / 5.0))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s] / s
    light = np.cos(angle) * xx + np.sin(angle) * yy
    gray = 140.0 + 18.0 * streaks + 30.0 * (light - light.mean())
    return np.repeat(gray[..., None], 3, axis=2)


def _wood(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s] / s
    warp = 0.06 * _smooth_noise(rng, s, s / 6.0) + 0.05 * np.sin(2 * np.pi * (xx * 0.7 + rng.uniform(0, 1)))
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * 7.0 + warp))
    fibres = _smooth_noise(rng, s, (0.5, s / 8.0))
    t = np.clip(0.65 * rings + 0.1 * fibres + 0.2, 0, 1)[..., None]
    light, dark = np.array([205.0, 165.0, 115.0]), np.array([130.0, 85.0, 50.0])
    return dark + t * (light - dark)


def _cap(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
    """A red bottle cap (disc with a ridged rim) on a dark background; returns (image, disc mask)."""
    bg = 55.0 + 6.0 * _smooth_noise(rng, s, 1.5)
    img = np.repeat(bg[..., None], 3, axis=2) * np.array([1.0, 1.0, 1.08])
    cx, cy = s / 2 + rng.uniform(-0.04, 0.04, size=2) * s
    radius = s * rng.uniform(0.36, 0.40)
    disc_img = Image.new("L", (s, s), 0)
    ImageDraw.Draw(disc_img).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    disc = np.asarray(disc_img) > 0
    yy, xx = np.mgrid[0:s, 0:s]
    r = np.hypot(xx - cx, yy - cy) / radius
    angle = np.arctan2(yy - cy, xx - cx)
    shade = 0.85 + 0.12 * (1 - r) - 0.08 * np.cos(angle + 0.8)
    ridges = np.where(r > 0.82, 0.10 * np.cos(angle * 48), 0.0)
    cap = (shade + ridges)[..., None] * np.array([200.0, 60.0, 55.0])
    img[disc] = cap[disc]
    return img, disc


def _texture(product: str, rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Clean float RGB texture in [_LO, _HI], and where defects may lie (None = anywhere)."""
    if product == "cap":
        img, region = _cap(rng, s)
    else:
        img, region = {"fabric": _fabric, "metal": _metal, "wood": _wood}[product](rng, s), None
    return np.clip(img, _LO, _HI), region


# -------------------------------------------------------------------------------------- defects
def _width(s: int, frac: float) -> int:
    # at least 2 px, so a defect survives downscaling to 64 px
    return max(2, int(round(s * frac)))


def _center(rng: np.random.Generator, s: int, region: np.ndarray | None, margin: float = 0.2):
    if region is None:
        return rng.uniform(margin, 1 - margin, size=2) * s
    ys, xs = np.nonzero(ndimage.binary_erosion(region, iterations=max(1, int(s * 0.12))))
    k = rng.integers(len(xs))
    return np.array([xs[k], ys[k]], dtype=np.float64)


def _draw_scratch(rng, s, region):
    mask = Image.new("L", (s, s), 0)
    c = _center(rng, s, region)
    theta = rng.uniform(0, np.pi)
    half = s * rng.uniform(0.18, 0.3)
    d = np.array([np.cos(theta), np.sin(theta)])
    bend = np.array([-d[1], d[0]]) * s * rng.uniform(-0.05, 0.05)
    pts = [tuple(c - half * d), tuple(c + bend), tuple(c + half * d)]
    ImageDraw.Draw(mask).line(pts, fill=255, width=_width(s, 1 / 40), joint="curve")
    return np.asarray(mask) > 0


def _draw_hole(rng, s, region):
    mask = Image.new("L", (s, s), 0)
    c = _center(rng, s, region)
    r = max(3.0, s * rng.uniform(0.05, 0.085))
    rx, ry = r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15)
    ImageDraw.Draw(mask).ellipse([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], fill=255)
    return np.asarray(mask) > 0


def _draw_crack(rng, s, region):
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    width = _width(s, 1 / 64)
    step = s * 0.055
    p = _center(rng, s, region, margin=0.3)
    theta = rng.uniform(0, 2 * np.pi)
    main = [p.copy()]
    for _ in range(int(rng.integers(6, 9))):
        theta += rng.uniform(-0.55, 0.55)
        p = p + step * np.array([np.cos(theta), np.sin(theta)])
        main.append(p.copy())
    draw.line([tuple(q) for q in main], fill=255, width=width, joint="curve")
    for _ in range(int(rng.integers(1, 3))):
        q = main[int(rng.integers(1, len(main) - 1))].copy()
        phi = theta + rng.choice([-1, 1]) * rng.uniform(0.6, 1.1)
        branch = [q.copy()]
        for _ in range(int(rng.integers(2, 4))):
            phi += rng.uniform(-0.4, 0.4)
            q = q + step * 0.8 * np.array([np.cos(phi), np.sin(phi)])
            branch.append(q.copy())
        draw.line([tuple(b) for b in branch], fill=255, width=width, joint="curve")
    return np.asarray(mask) > 0


def _draw_stain(rng, s, region):
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    c = _center(rng, s, region)
    for _ in range(int(rng.integers(3, 6))):
        o = c + rng.normal(0, s * 0.04, size=2)
        rx, ry = s * rng.uniform(0.05, 0.1, size=2)
        draw.ellipse([o[0] - rx, o[1] - ry, o[0] + rx, o[1] + ry], fill=255)
    # soften the union of ellipses into one irregular blob
    blob = ndimage.gaussian_filter(np.asarray(mask, dtype=np.float64), s / 40.0)
    return blob > 127.5


_SHAPES = {"scratch": _draw_scratch, "hole": _draw_hole, "crack": _draw_crack, "stain": _draw_stain}
_STAIN_TINT = {"fabric": (0.75, 0.55, 0.3), "metal": (0.55, 0.55, 0.55), "wood": (0.5, 0.45, 0.4),
               "cap": (0.45, 0.7, 0.4)}


def _apply_defect(img: np.ndarray, mask: np.ndarray, defect: str, product: str, s: int) -> np.ndarray:
    """Change ``img`` inside ``mask`` only (alpha is exactly 0 outside)."""
    out = img.copy()
    m = mask
    if defect == "scratch":
        out[m] = 0.2 * img[m] + 0.8 * 245.0
    elif defect == "crack":
        out[m] = 0.22 * img[m]
    elif defect == "hole":
        depth = ndimage.distance_transform_edt(m)
        rim = m & (depth <= max(1.0, depth.max() * 0.3))
        core = m & ~rim
        out[core] = 12.0 + 0.05 * img[core]
        out[rim] = np.minimum(255.0, img[rim] * 1.3 + 40.0)
    elif defect == "stain":
        depth = ndimage.distance_transform_edt(m)
        alpha = 0.5 + 0.4 * np.clip(depth / max(1.0, depth.max()), 0, 1)
        tint = np.array(_STAIN_TINT[product])
        stained = np.clip(img * tint, 0, 255)
        out[m] = (1 - alpha[m, None]) * img[m] + alpha[m, None] * stained[m]
    else:
        raise ValueError(f"unknown synthetic defect type {defect!r}; known: {', '.join(_SHAPES)}")
    return out


# ------------------------------------------------------------------------------------- samples
@dataclass
class SynthSample:
    """One rendered picture: the clean texture, the picture with its defect, and the exact mask."""

    clean: np.ndarray  # uint8 HxWx3, after exposure (what the image would be without the defect)
    image: np.ndarray  # uint8 HxWx3
    mask: np.ndarray   # bool HxW (all False for good)


def render_sample(seed: int, product: str, defect: str, group: int, exposure: int, size: int) -> SynthSample:
    """Render one picture. Group members share texture and defect geometry; exposure changes
    brightness and sensor noise (like one physical part shot at several exposures).

    ``group`` numbers are per (product, defect); for good images pass defect ``"good-train"`` or
    ``"good-test"`` so the two good folders never share a part.
    """
    if product not in PRODUCTS:
        raise ValueError(f"unknown synthetic product {product!r}; known: {', '.join(PRODUCTS)}")
    kinds = ("good-train", "good-test") + PRODUCTS[product]
    if defect not in kinds:
        raise ValueError(f"product {product!r} has no synthetic defect {defect!r}; known: {', '.join(kinds)}")
    p_idx, d_idx = list(PRODUCTS).index(product), kinds.index(defect)
    rng = np.random.default_rng([seed, p_idx, d_idx, group])
    clean, region = _texture(product, rng, size)
    if defect.startswith("good"):
        mask = np.zeros((size, size), bool)
        img = clean
    else:
        mask = _SHAPES[defect](rng, size, region)
        if region is not None:
            mask &= region
        img = _apply_defect(clean, mask, defect, product, size)
    shot = np.random.default_rng([seed, p_idx, d_idx, group, 1000 + exposure])
    gain = EXPOSURES[exposure]
    noise = shot.normal(0, 2.0, size=(size, size, 1 if product in GRAYSCALE else 3))

    def expose(a: np.ndarray) -> np.ndarray:
        return np.clip(np.round(a * gain + noise), 0, 255).astype(np.uint8)

    return SynthSample(clean=expose(clean), image=expose(img), mask=mask)


def _save_png(array: np.ndarray, path: Path, gray: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(array[..., 0] if gray else array), "L" if gray else "RGB")
    img.save(path, format="PNG")  # Pillow writes no time chunk: identical bytes on every run


def check_synth_args(size: int, products: int) -> None:
    from defectforge.errors import ConfigError

    if not 1 <= products <= len(PRODUCTS):
        raise ConfigError(f"--products: products must be 1..{len(PRODUCTS)}, got {products}")
    if size < 32:
        raise ConfigError(f"--size: size must be at least 32 px (defects must stay visible), got {size}")


def write_synthetic(out: str | Path, seed: int = 0, size: int = 128, products: int = 2) -> Path:
    """Write the synthetic dataset (MVTec layout, ``metadata.csv``, ``README.txt``) to ``out``.

    Per product: 40 train/good, 10 test/good, 12 images per defect type (6 groups x 2 exposures).
    Returns ``out``. Existing files are overwritten; nothing else in ``out`` is touched.
    """
    check_synth_args(size, products)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta: list[dict] = []
    names = list(PRODUCTS)[:products]
    for product in names:
        pdir = out / product
        gray = product in GRAYSCALE
        jobs = [("train", "good", "good-train", N_TRAIN_GOOD), ("test", "good", "good-test", N_TEST_GOOD)]
        jobs += [("test", d, d, N_PER_DEFECT) for d in PRODUCTS[product]]
        for split, folder, kind, n in jobs:
            for i in range(n):
                group, exposure = divmod(i, len(EXPOSURES))
                sample = render_sample(seed, product, kind, group, exposure, size)
                sid = f"{i:03d}"
                _save_png(sample.image, pdir / split / folder / f"{sid}.png", gray)
                if folder != "good":
                    mask = (sample.mask * 255).astype(np.uint8)
                    _save_png(mask[..., None], pdir / "ground_truth" / folder / f"{sid}_mask.png", True)
                meta.append(dict(split=split, product=product, cls=folder, id=sid,
                                 group=f"{product}_{kind}_g{group:03d}", exposure=exposure))
    with open(out / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["split", "product", "cls", "id", "group", "exposure"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(meta)
    (out / "README.txt").write_text(_README.format(seed=seed, size=size, products=", ".join(names)))
    return out


_README = """defectforge synthetic defect dataset
====================================

Procedurally generated by `defectforge data synth` (seed {seed}, {size}x{size} px), for tests and
laptop runs. It is NOT real industrial data. Products: {products}.

Layout (MVTec AD): <product>/train/good, <product>/test/good, <product>/test/<defect>,
<product>/ground_truth/<defect>/<id>_mask.png (0/255, exact: a mask pixel is one the defect changed).
Defect types: scratch (thin bright line), hole (dark blob with a light rim), crack (dark branching
line), stain (soft coloured blob). 'metal' images are 8-bit grayscale; the others are RGB.

Each group of 2 consecutive ids is one "part" shot at two exposures; metadata.csv
(split,product,cls,id,group,exposure) names the group so splits can keep parts on one side.
The same seed always gives byte-identical files.
"""
