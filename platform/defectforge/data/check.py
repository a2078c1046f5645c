"""``data check``: validate every sample of a dataset and report all problems at once.

Why a checker separate from the reader: training wants the first bad file to stop it (or to be
skipped); a person preparing data wants the whole list in one pass, with counts, so they can fix
everything before a long run. Every image and mask is decoded at its stored size with the same
checks as ``load_sample`` (``read_native``), and the scan's structural issues are added.
Decoding runs on a thread pool: Pillow releases the GIL while decoding, so this scales with cores.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from defectforge.data.mvtec import read_native, scan_dataset
from defectforge.data.sample import BadSampleError, DataError, SampleRef


@dataclass
class CheckReport:
    """Result of ``check_dataset``.

    ``counts[product][(split, defect)]`` = images found; ``bad_counts`` the same for bad samples.
    ``bad`` lists every problem as (path, reason): bad samples first, then structural issues.
    ``skipped`` = bad samples left out when ``on_bad_sample == "skip"`` (0 in ``error`` mode).
    """

    root: Path
    on_bad_sample: str
    classes: dict[str, tuple[str, ...]]
    counts: dict[str, dict[tuple[str, str], int]]
    bad_counts: dict[str, dict[tuple[str, str], int]]
    bad: list[tuple[Path, str]]
    n_bad_samples: int
    skipped: int
    modes: dict[str, Counter] = field(default_factory=dict)
    sizes: dict[str, Counter] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    @property
    def ok(self) -> bool:
        """True when a run with this ``on_bad_sample`` policy can go ahead (exit code 0)."""
        return not self.bad or self.on_bad_sample == "skip"

    def is_grayscale(self, product: str) -> bool:
        return bool(self.modes.get(product)) and set(self.modes[product]) <= {"L", "I;16", "I", "1", "LA"}

    def format(self) -> str:
        lines = [f"dataset {self.root}"]
        header = f"  {'product':<16} {'split':<6} {'defect':<16} {'class':>5} {'images':>7} {'bad':>5}"
        for product, counts in self.counts.items():
            modes = ", ".join(f"{m} x{n}" for m, n in sorted(self.modes.get(product, Counter()).items()))
            sizes = ", ".join(f"{w}x{h} x{n}" for (w, h), n in self.sizes.get(product, Counter()).most_common(3))
            lines.append(f"product {product}: {len(self.classes[product])} defect types "
                         f"({', '.join(self.classes[product])}); "
                         f"{'grayscale' if self.is_grayscale(product) else 'colour'} [{modes}]; sizes {sizes}")
            lines.append(header)
            order = sorted(counts, key=lambda k: (k[0] != "train", k[1] != "good", k[1]))
            for split, defect in order:
                cid = 0 if defect == "good" else self.classes[product].index(defect) + 1
                nbad = self.bad_counts.get(product, {}).get((split, defect), 0)
                lines.append(f"  {product:<16} {split:<6} {defect:<16} {cid:>5} "
                             f"{counts[(split, defect)]:>7} {nbad:>5}")
        lines.append(f"{self.n_images} images, {self.n_bad_samples} bad samples, "
                     f"{len(self.bad) - self.n_bad_samples} structural issues")
        if self.bad:
            lines.append("problems:")
            lines.extend(f"  {path}: {reason}" for path, reason in self.bad)
        if self.on_bad_sample == "skip" and self.bad:
            lines.append(f"{self.skipped} skipped")
        return "\n".join(lines)


def check_dataset(
    root: str | Path,
    products: list[str] | None = None,
    on_bad_sample: str = "error",
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> CheckReport:
    """Decode and validate every sample under ``root``; collect every problem into a report.

    Dataset-level problems (no such folder, unknown product) still raise ``DataError``: there is
    nothing to count. ``progress(done, total)`` is called as samples finish.
    """
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample must be 'error' or 'skip', not {on_bad_sample!r}")
    index = scan_dataset(root, products)
    counts: dict[str, dict[tuple[str, str], int]] = {p: defaultdict(int) for p in index.products}
    bad_counts: dict[str, dict[tuple[str, str], int]] = {p: defaultdict(int) for p in index.products}
    modes: dict[str, Counter] = {p: Counter() for p in index.products}
    sizes: dict[str, Counter] = {p: Counter() for p in index.products}
    for classes_product, classes in index.classes.items():
        for d in classes:  # list defect types that exist in classes.json but have no images
            counts[classes_product].setdefault(("test", d), 0)

    def validate(ref: SampleRef):
        try:
            native = read_native(ref, index.classes[ref.product])
            return ref, native.mode, native.image.shape[:2], None
        except BadSampleError as exc:
            return ref, None, None, (exc.path, exc.reason)

    bad: list[tuple[Path, str]] = []
    total = len(index.refs)
    n_workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for done, (ref, mode, shape, problem) in enumerate(pool.map(validate, index.refs), start=1):
            key = (ref.split, ref.defect)
            counts[ref.product][key] += 1
            if problem is not None:
                bad.append(problem)
                bad_counts[ref.product][key] += 1
            else:
                modes[ref.product][mode] += 1
                sizes[ref.product][(shape[1], shape[0])] += 1
            if progress is not None:
                progress(done, total)
    n_bad_samples = len(bad)
    bad.extend(index.issues)
    return CheckReport(
        root=Path(root),
        on_bad_sample=on_bad_sample,
        classes=index.classes,
        counts={p: dict(c) for p, c in counts.items()},
        bad_counts={p: dict(c) for p, c in bad_counts.items()},
        bad=bad,
        n_bad_samples=n_bad_samples,
        skipped=n_bad_samples if on_bad_sample == "skip" else 0,
        modes=modes,
        sizes=sizes,
    )
