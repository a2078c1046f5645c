"""KID via clean-fid's ``kernel_distance``, made reproducible.

Why a wrapper: ``cleanfid.fid.kernel_distance(feats1, feats2, num_subsets=100,
max_subset_size=1000)`` averages the unbiased MMD^2 estimate with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3`` over ``num_subsets`` subsets of ``m = min(n1, n2, max_subset_size)``
rows drawn from each set with numpy's *global* RNG (``np.random.choice``). Unseeded, the same
features give a different KID on every call whenever a set has more than ``m`` rows. We:

* seed that draw: the global numpy RNG state is saved, seeded with ``seed`` for the call, and
  restored afterwards, so callers' random streams are undisturbed (numpy's global state is
  per-process, so Ray actors do not interfere with each other);
* when both sets have exactly ``m`` rows (equal sizes, at most ``max_subset_size``), every
  "subset" is the whole set in a new order and the estimator is order-invariant, so all subsets
  give the same value: one subset is computed, which is the exact unbiased MMD^2 over all
  features. With unequal sizes the larger set is still sub-sampled to ``m`` rows (that is
  clean-fid's estimator), seeded as above.

KID needs every feature row (it is not a function of mean and covariance), so unlike FID it is
computed from collected features.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def kid(
    feats_a: Any,
    feats_b: Any,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance (unbiased MMD^2, cubic kernel) between two feature arrays."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    for name, f in (("feats_a", a), ("feats_b", b)):
        if f.ndim != 2:
            raise ValueError(f"KID: {name} must be 2-D (rows = samples), got shape {f.shape}")
        if f.shape[0] < 2:
            raise ValueError(f"KID: {name} has {f.shape[0]} rows; the unbiased estimate needs at least 2")
        if not np.isfinite(f).all():
            raise ValueError(f"KID: {name} contains NaN or infinite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"KID: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if num_subsets < 1 or max_subset_size < 2:
        raise ValueError("KID: num_subsets must be >= 1 and max_subset_size >= 2")

    m = min(a.shape[0], b.shape[0], max_subset_size)
    if a.shape[0] == m and b.shape[0] == m:
        num_subsets = 1  # every subset is a permutation of all rows: the value is exact and the same
    from cleanfid.fid import kernel_distance  # lazily: it imports torchvision (see the package doc)

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(a, b, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)
