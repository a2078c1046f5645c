"""Downstream segmentation: do the synthetic pairs make an inspection model better?

Protocol (one seed, one condition; ``run_one``):

1. carve a validation split from the REAL training rows (seeded, stratified by (product, defect),
   disjoint from the rest) -- ``carve_validation_rows``;
2. condition ``real``: train on the rest; condition ``real+synthetic``: the same rows plus
   ``ratio`` x (number of real defect images) synthetic rows, drawn deterministically and tagged
   ``split="synthetic"`` -- ``mix_synthetic``;
3. train the small U-Net (``segmenter.SegUNet``) and keep the state with the best validation
   pixel AP -- ``train_segmenter``;
4. evaluate the selected model once on the test rows -- ``evaluate_segmenter``.

``downstream_gain`` runs both conditions for each seed and reports mean +- std per metric and the
gain (b - a). Pipelines that parallelise (Ray tasks) call ``run_one`` per (condition, seed) and
``aggregate_runs`` on the results.

Why so strict about the test split: AnomalyDiffusion's published downstream model is selected on
its test set, which inflates the numbers (DESIGN.md). Here model selection only ever sees
``val_rows``; a row whose ``split`` is ``"test"`` in training or validation is an error, and
validation ids must be disjoint from training ids.

Pure torch/numpy/scikit-learn: no Ray, no MLflow. Everything returned is plain Python (JSON-able).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectforge.evaluate.seg_metrics import METRIC_NAMES, segmentation_metrics
from defectforge.evaluate.segmenter import SegUNet

Row = dict[str, Any]

REAL, MIXED = "real", "real+synthetic"
CONDITIONS = (REAL, MIXED)
SELECTION_METRIC = "pixel_ap"
#: Metrics averaged over seeds (the F1-max threshold is an operating point, not a score).
AGGREGATED = tuple(m for m in METRIC_NAMES if m != "f1_threshold")


# ------------------------------------------------------------------------------- rows -> arrays
def row_name(row: Row) -> str:
    """``product/defect/id``: how a row is named in messages and ``info`` (ids alone repeat
    across products, defect folders and train/test, as in MVTec)."""
    return f"{row.get('product', '?')}/{row.get('defect', '?')}/{row.get('id', '?')}"


def _stack_rows(rows: Sequence[Row], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x H x W x 3, defect labels bool N x H x W); errors name the row and field."""
    if len(rows) == 0:
        raise ValueError(f"{name} is empty")
    images, labels = [], []
    shape = None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{name}[{i}] is a {type(row).__name__}, not a sample dict")
        rid = row_name(row)
        for key in ("image", "mask", "id", "split"):
            if key not in row:
                raise ValueError(f"{name}: row {rid!r} has no field {key!r}")
        img, mask = np.asarray(row["image"]), np.asarray(row["mask"])
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{name}: row {rid!r} field 'image' must be uint8 H x W x 3, "
                             f"got {img.dtype} {img.shape}")
        if mask.dtype != np.uint8 or mask.shape != img.shape[:2]:
            raise ValueError(f"{name}: row {rid!r} field 'mask' must be uint8 {img.shape[:2]}, "
                             f"got {mask.dtype} {mask.shape}")
        if shape is None:
            shape = img.shape
        elif img.shape != shape:
            raise ValueError(f"{name}: row {rid!r} is {img.shape[:2]} but earlier rows are "
                             f"{shape[:2]}; resize all rows to one resolution")
        images.append(img)
        labels.append(mask > 0)
    return np.stack(images), np.stack(labels)


def _to_input(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1] (the model normalises itself)."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _check_no_test(rows: Sequence[Row], name: str) -> None:
    bad = [row_name(r) for r in rows if isinstance(r, dict) and r.get("split") == "test"]
    if bad:
        raise ValueError(f"{name} holds {len(bad)} row(s) of the test split (e.g. {bad[0]}); "
                         "the test split must never be used for training or model selection")


def _has_defect(row: Row) -> bool:
    return bool(np.any(np.asarray(row["mask"]) > 0))


def _fingerprint(row: Row) -> bytes:
    img = np.ascontiguousarray(row["image"])
    return hashlib.blake2b(img.tobytes() + str(img.shape).encode(), digest_size=16).digest()


def _check_disjoint(a: Sequence[Row], b: Sequence[Row], name_a: str, name_b: str) -> None:
    """Raise if an image of ``a`` is pixel-identical to one of ``b``.

    Why pixels and not ids: ids are not unique across a dataset (MVTec has train/good/000 and
    test/good/000), and a leak is the same image on both sides, whatever it is called.
    """
    seen = {_fingerprint(r): r for r in a}
    for r in b:
        hit = seen.get(_fingerprint(r))
        if hit is not None:
            raise ValueError(f"{name_a} and {name_b} share an image: {row_name(hit)} == {row_name(r)}; "
                             f"they must be disjoint")


# ------------------------------------------------------------------------------------ evaluate
@torch.inference_mode()
def predict_probs(model: torch.nn.Module, rows: Sequence[Row], batch_size: int = 32) -> np.ndarray:
    """Defect probabilities (N x H x W, float32) of ``model`` on ``rows``, on the model's device."""
    images, _ = _stack_rows(rows, "rows")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [torch.sigmoid(model(_to_input(images[i:i + batch_size], device)))[:, 0].float().cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def evaluate_segmenter(model: torch.nn.Module, test_rows: Sequence[Row],
                       batch_size: int = 32) -> dict[str, float]:
    """Pixel AUROC / AP / F1-max, mIoU (mean of defect and background IoU at the F1-max
    threshold), image AUROC / AP of ``model`` on ``test_rows`` (see ``seg_metrics``)."""
    _, labels = _stack_rows(test_rows, "test_rows")
    return segmentation_metrics(predict_probs(model, test_rows, batch_size), labels)


# ------------------------------------------------------------------------------------ training
def _dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over the whole batch; ``eps`` keeps defect-free batches well defined."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1 - (2 * inter + eps) / (p.sum() + target.sum() + eps)


def _flip(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal and vertical flips per sample (same flip for image and mask)."""
    for dim in (-1, -2):
        sel = torch.from_numpy(rng.random(len(x)) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(sel, x.flip(dim), x)
        y = torch.where(sel, y.flip(dim), y)
    return x, y


def train_segmenter(
    train_rows: Sequence[Row],
    val_rows: Sequence[Row],
    steps: int,
    seed: int,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    lr: float = 2e-3,
    eval_every: int | None = None,
    base: int = 16,
    levels: int = 3,
) -> tuple[SegUNet, dict[str, Any]]:
    """Train a ``SegUNet`` from scratch on ``train_rows``; select the state with the best
    validation pixel AP, evaluated on ``val_rows`` every ``eval_every`` steps (default steps/10)
    and after the last step.

    Seeded (torch init + numpy batch order and flips); BCE + Dice loss; defect-free rows are
    trained on with all-zero masks. Batches are drawn by reshuffling ``train_rows`` each epoch.
    Returns the selected model (eval mode, on ``device``) and ``info`` with the selection history.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    _check_no_test(train_rows, "train_rows")
    _check_no_test(val_rows, "val_rows")
    images, labels = _stack_rows(train_rows, "train_rows")
    val_images, val_labels = _stack_rows(val_rows, "val_rows")
    if val_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"val_rows are {val_images.shape[1:3]} but train_rows are {images.shape[1:3]}")
    # Synthetic rows are exempt: a generator trained on all real training images may reproduce a
    # validation image; that is the generator's (measured) weakness, not a selection leak.
    _check_disjoint([r for r in train_rows if r.get("split") != "synthetic"], val_rows,
                    "train_rows", "val_rows")
    if not val_labels.any():
        raise ValueError("val_rows hold no defect pixels: selection by validation pixel AP is undefined")
    eval_every = eval_every or max(1, steps // 10)

    rng = np.random.default_rng(seed)
    history: list[dict[str, Any]] = []
    best_ap, best_step, best_state = -math.inf, 0, None
    with torch.random.fork_rng(devices=[]):  # seed torch without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = SegUNet(base=base, levels=levels).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        order, pos, losses = rng.permutation(len(images)), 0, []
        for step in range(1, steps + 1):
            if pos + batch_size > len(order):
                order, pos = np.concatenate([order[pos:], rng.permutation(len(images))]), 0
            idx = np.sort(order[pos:pos + batch_size])
            pos += batch_size
            x = _to_input(images[idx], device)
            y = torch.from_numpy(labels[idx]).to(device).float().unsqueeze(1)
            x, y = _flip(x, y, rng)
            logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits, y) + _dice_loss(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"segmenter loss is {loss.item()} at step {step} (seed {seed})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % eval_every == 0 or step == steps:
                # Module-level lookup on purpose: tests instrument this call to prove that
                # selection only ever sees the validation rows.
                metrics = evaluate_segmenter(model, val_rows)
                history.append({"step": step, "train_loss": float(np.mean(losses)),
                                **{f"val_{k}": v for k, v in metrics.items()}})
                losses = []
                if metrics[SELECTION_METRIC] > best_ap:
                    best_ap, best_step = metrics[SELECTION_METRIC], step
                    best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    info = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": eval_every,
        "selection_metric": f"val_{SELECTION_METRIC}", "best_step": best_step,
        f"best_val_{SELECTION_METRIC}": float(best_ap), "history": history,
        "n_train": len(train_rows), "n_val": len(val_rows),
        "n_synthetic": sum(r.get("split") == "synthetic" for r in train_rows),
        "val_rows": [row_name(r) for r in val_rows],
    }
    return model, info


# ------------------------------------------------------------------------------ splits, mixing
def can_carve_validation(rows: Sequence[Row]) -> bool:
    """Whether ``carve_validation_rows`` can give val a defect: some (product, defect) stratum holds
    at least 2 rows with defect pixels (a stratum of n >= 2 gives val at least one and keeps one).
    Exact when a stratum's rows all have defect pixels; a defect image with an empty mask can still
    leave val without one, which the carve itself reports."""
    strata = Counter((str(r.get("product", "")), str(r.get("defect", ""))) for r in rows if _has_defect(r))
    return max(strata.values(), default=0) >= 2


def carve_validation_rows(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, val): a seeded, stratified, disjoint validation carve of real training rows.

    Strata are (product, defect), so val holds defect and defect-free rows when both exist.
    A stratum of n >= 2 rows gives max(1, round(fraction * n)) rows to val but keeps at least one
    in train; a single-row stratum stays in train. Rows are ordered by id first, so the result
    depends on the seed only, not on input order (up to rows with equal id and split). Val rows
    are tagged ``split="val"``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    _check_no_test(rows, "real_train_rows")
    strata: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (str(r["id"]), str(r.get("split")))):
        strata[(str(r.get("product", "")), str(r.get("defect", "")))].append(r)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for key in sorted(strata):
        group = strata[key]
        perm = rng.permutation(len(group))
        n_val = 0 if len(group) < 2 else min(len(group) - 1, max(1, int(fraction * len(group) + 0.5)))
        val += [dict(group[i], split="val") for i in sorted(perm[:n_val])]
        train += [group[i] for i in sorted(perm[n_val:])]
    if not any(_has_defect(r) for r in val):
        raise ValueError("validation carve holds no defect pixels: need at least 2 defect images of "
                         "one (product, defect) type in real_train_rows")
    return train, val


def mix_synthetic(train_rows: Sequence[Row], synthetic_rows: Sequence[Row], ratio: float,
                  seed: int) -> list[Row]:
    """``train_rows`` plus round(ratio x #real defect images) synthetic rows, tagged
    ``split="synthetic"``, drawn by seeded permutations (cycled if more are needed than exist)."""
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    n_real_defect = sum(str(r.get("defect")) != "good" for r in train_rows)
    n = int(ratio * n_real_defect + 0.5)
    if n and not synthetic_rows:
        raise ValueError("synthetic_rows is empty but the real+synthetic condition needs some")
    rng = np.random.default_rng([seed, 1])  # a stream distinct from the carve's and training's
    picks: list[int] = []
    while len(picks) < n:
        picks += rng.permutation(len(synthetic_rows)).tolist()
    _check_no_test([synthetic_rows[i] for i in set(picks[:n])], "synthetic_rows")
    return list(train_rows) + [dict(synthetic_rows[i], split="synthetic") for i in picks[:n]]


# -------------------------------------------------------------------------- conditions, seeds
def run_one(
    condition: str,
    real_train_rows: Sequence[Row],
    synthetic_rows: Sequence[Row],
    test_rows: Sequence[Row],
    seed: int,
    steps: int,
    val_fraction: float = 0.2,
    ratio: float = 1.0,
    device: str | torch.device = "cpu",
    **train_kwargs: Any,
) -> dict[str, Any]:
    """One (condition, seed): carve val from the real rows, train, select on val, test once.

    The carve depends on ``seed`` only, so both conditions of a seed share one validation split.
    Returns ``{"condition", "seed", "metrics" (test), "info" (training + selection history)}``.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    train, val = carve_validation_rows(real_train_rows, val_fraction, seed)
    _check_disjoint(real_train_rows, test_rows, "real_train_rows", "test_rows")
    if condition == MIXED:
        train = mix_synthetic(train, synthetic_rows, ratio, seed)
    model, info = train_segmenter(train, val, steps=steps, seed=seed, device=device, **train_kwargs)
    metrics = evaluate_segmenter(model, test_rows)
    info["ratio"] = ratio if condition == MIXED else 0.0
    return {"condition": condition, "seed": seed, "metrics": metrics, "info": info}


def _mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; nan for a single seed)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else math.nan}


def aggregate_runs(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine ``run_one`` outputs: per-seed metrics, mean +- std per condition and metric, and the
    gain (real+synthetic minus real, paired per seed) mean +- std. Std is the sample std (ddof=1)."""
    by_seed: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
    for r in results:
        if r["condition"] in by_seed[r["seed"]]:
            raise ValueError(f"two results for condition {r['condition']!r}, seed {r['seed']}")
        by_seed[r["seed"]][r["condition"]] = r["metrics"]
    per_seed = []
    for seed in sorted(by_seed):
        missing = [c for c in CONDITIONS if c not in by_seed[seed]]
        if missing:
            raise ValueError(f"seed {seed} has no result for condition(s) {missing}")
        a, b = by_seed[seed][REAL], by_seed[seed][MIXED]
        per_seed.append({"seed": seed, REAL: a, MIXED: b, "gain": {m: b[m] - a[m] for m in AGGREGATED}})
    summary = {c: {m: _mean_std([s[c][m] for s in per_seed]) for m in AGGREGATED}
               for c in (*CONDITIONS, "gain")}
    return {"seeds": [s["seed"] for s in per_seed], "per_seed": per_seed, **summary,
            "std": "sample std over seeds (ddof=1)"}


def downstream_gain(
    real_train_rows: Sequence[Row],
    synthetic_rows: Sequence[Row],
    test_rows: Sequence[Row],
    seeds: Sequence[int] = (0, 1),
    steps: int = 300,
    val_fraction: float = 0.2,
    ratio: float = 1.0,
    device: str | torch.device = "cpu",
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Both conditions for every seed, sequentially, then ``aggregate_runs``.

    ``result["gain"][metric]["mean"]`` is the mean over seeds of (b - a); ``result["runs"]`` keeps
    each run's training info (selection history)."""
    if not seeds:
        raise ValueError("seeds is empty")
    runs = [run_one(c, real_train_rows, synthetic_rows, test_rows, seed=s, steps=steps,
                    val_fraction=val_fraction, ratio=ratio, device=device, **train_kwargs)
            for s in seeds for c in CONDITIONS]
    return {**aggregate_runs(runs), "runs": runs}
