"""``evaluate(...)``: judge a generator checkpoint (or a folder / Parquet of generated pairs).

Order of work, cheapest failure first:

1. configuration and inputs (checkpoint meta, dataset scan) and the feature extractors' weights:
   a missing standard weights file fails here, naming the file, before any generation;
2. the real data, split by the SAME protocol as training (``make_split`` with ``data.split``):
   few-shot defect train images + ``train/good`` for segmentation training and IC-LPIPS centres,
   the held-out test split for segmentation testing, all real defect images of a (product,
   defect) as its fidelity reference;
3. the Ray Data pipeline (``pipeline.py``): generation, features, streaming FID statistics, KID,
   IS, LPIPS / IC-LPIPS, mask quality; then defect quality (``add_defect_quality``: mask-area
   ratio, visibility ratios, memorisation) from the same pair blocks;
4. downstream segmentation per product: products x seeds x {real, real+synthetic} as Ray tasks
   (``segmentation.run_one``), combined with ``aggregate_runs`` (mean ± std, gain b - a);
5. the report: summary JSON, printed table, sample grid, Parquet, one MLflow run.

Level conventions: FID, KID and IS pool the feature rows of a level (defect type, product,
overall); LPIPS, IC-LPIPS, mask and defect quality are computed per defect type and averaged
over the types of a product (and over all types overall), because pooling different defect types
would measure the spread between types rather than within them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from defectforge.config import ConfigBase
from defectforge.errors import ConfigError, DataError

SEG_VAL_FRACTION = 0.2


# ------------------------------------------------------------------------------- preflight
def check_extractors(cfg: ConfigBase) -> tuple[str, str]:
    """(feature-extractor name, LPIPS name) in force; raises ``MissingWeightsError`` early.

    The standard networks' files are checked (and LPIPS's backbone loaded) on the driver before
    any generation, so a missing file costs seconds, not a generation run.
    """
    from defectforge.evaluate.metrics import build_lpips
    from defectforge.evaluate.metrics.extractors import INCEPTION_FILE, weights_file

    ev = cfg.evaluation
    if ev.feature_extractor == "standard":
        from cleanfid.downloads_helper import inception_url

        weights_file(INCEPTION_FILE, ev.weights_dir, "clean-fid's Inception TorchScript", inception_url,
                     "set evaluation.feature_extractor=randfeat")
        return "inception", build_lpips("standard", ev.weights_dir).name
    return ev.feature_extractor, build_lpips("randnet").name


def settle_extractors(cfg: ConfigBase, log: Any = print) -> ConfigBase:
    """One weights policy for every command (evaluate, sweep, the main job, the jobs/ scripts).

    ``evaluation.feature_extractor=standard`` (the default) uses the standard networks when the
    weights folder holds their files; when it does not, the stand-in extractors (``randfeat``
    features, ``randnet`` LPIPS) take over, every metric name says so (``kid_randfeat``,
    ``lpips_randnet``), and one line tells the user. ``evaluation.require_standard_weights=true``
    turns a missing file into the ``MissingWeightsError`` naming it. Returns the config in force,
    so the objective names, the trials and the summary all agree on the extractor.
    """
    from defectforge.config import with_overrides
    from defectforge.errors import MissingWeightsError

    ev = cfg.evaluation
    if ev.feature_extractor != "standard":
        return cfg
    try:
        check_extractors(cfg)
    except MissingWeightsError as exc:
        if ev.require_standard_weights:
            raise
        reason = str(exc).split(": put ")[0]
        log(f"[weights] standard metrics unavailable ({reason}): using the stand-in extractors, metric names "
            "end in _randfeat / _randnet; set evaluation.require_standard_weights=true to make this an error",
            flush=True)
        return with_overrides(cfg, {"evaluation.feature_extractor": "randfeat"})
    return cfg


def _metric_names(extractor: str, lpips_name: str) -> dict[str, str]:
    from defectforge.evaluate.metrics import metric_name

    return {"fid": metric_name("fid", extractor), "kid": metric_name("kid", extractor),
            "is": metric_name("is", extractor), "lpips": metric_name("lpips", lpips_name),
            "ic_lpips": metric_name("ic_lpips", lpips_name)}


# ------------------------------------------------------------------------------------ real data
def _key(ref: Any) -> tuple[str, str, str, str]:
    return (ref.product, ref.defect, ref.id, str(ref.image_path))


def load_real(cfg: ConfigBase, root: Path, products: list[str], resolution: int) -> dict[str, Any]:
    """Real rows per product, split by the training protocol (``data.split``)."""
    from defectforge.data.mvtec import load_rows, scan_dataset
    from defectforge.data.splits import make_split

    index = scan_dataset(root, products)
    manifest = make_split(index, cfg.data.split)
    train_refs = list(manifest.train)
    train_keys = {_key(r) for r in train_refs}
    test_refs = list(getattr(manifest, "test", None) or [r for r in index.refs if _key(r) not in train_keys])
    few_shot = [r for r in train_refs if not r.is_good]
    good_train = [r for r in train_refs if r.is_good] or [r for r in index.refs if r.is_good and r.split == "train"]
    test_keys = {_key(r) for r in test_refs}
    if train_keys & test_keys:
        raise DataError(f"{root}: the {cfg.data.split.protocol} split is not disjoint")

    def rows(refs: list[Any], split: str) -> list[dict[str, Any]]:
        loaded, _ = load_rows(index, refs, resolution, cfg.data.on_bad_sample)
        return [dict(r, split=split) for r in loaded]

    few_rows, good_rows, test_rows = rows(few_shot, "train"), rows(good_train, "train"), rows(test_refs, "test")
    reference = few_rows + [r for r in test_rows if r["defect"] != "good"]
    return {"index": index, "manifest": manifest.to_json() if hasattr(manifest, "to_json") else {},
            "few_shot": few_rows, "good_train": good_rows, "test": test_rows, "reference": reference}


# ---------------------------------------------------------------------------------- metrics
def fidelity_and_diversity(result: Any, classes: dict[str, tuple[str, ...]], names: dict[str, str],
                           kid_subsets: int = 100) -> dict[str, Any]:
    """Per (product, defect), per product and overall metric dicts from a ``PipelineResult``."""
    from defectforge.evaluate.actors import GENERATED
    from defectforge.evaluate.pipeline import level_fidelity, level_match, pool_level, products_with_pairs

    with_pairs = products_with_pairs(classes, {k[1:] for k in result.stats if k[0] == GENERATED})

    def level(key: tuple[str | None, str | None]) -> dict[str, float]:
        """FID / KID / IS of a level: from the pipeline's tasks (``PipelineResult.fidelity``), else here."""
        got = result.fidelity.get(key) if result.kid_subsets == kid_subsets else None
        if got is None:
            got = level_fidelity(*pool_level(result.stats, result.features, result.logits, key, with_pairs),
                                 kid_subsets=kid_subsets)
        out = {"n_generated": got["n_generated"], "n_real": got["n_real"], names["fid"]: got["fid"],
               names["kid"]: got["kid"]}
        if "is" in got:
            out[names["is"]], out[names["is"] + "_std"] = got["is"], got["is_std"]
        return out

    div = {(r["product"], r["defect"]): r for r in result.diversity}
    div_keys = [k for k in next(iter(div.values()), {}) if k not in ("product", "defect", "n")]

    def diversity_mean(match) -> dict[str, float]:
        rows = [v for (p, d), v in div.items() if match(p, d)]
        out = {}
        for k in div_keys:
            vals = [float(r[k]) for r in rows if k in r and _finite(r[k])]
            out[k] = float(np.mean(vals)) if vals else math.nan
        return out

    products: dict[str, Any] = {}
    for p in classes:
        defects = {}
        for d in classes[p]:
            if (GENERATED, p, d) not in result.stats:
                continue
            defects[d] = {**level((p, d)),
                          **{k: float(v) for k, v in div.get((p, d), {}).items() if k in div_keys}}
        if not defects:
            continue
        products[p] = {"metrics": {**level((p, None)), **diversity_mean(level_match((p, None), with_pairs))},
                       "defects": defects}
    overall = {**level((None, None)), **diversity_mean(level_match((None, None), with_pairs))}
    return {"products": products, "overall": overall}


# ------------------------------------------------------------------------------ defect quality
def _quality_block(train_thumbs: dict[tuple[str, str], np.ndarray], block: dict[str, np.ndarray]
                   ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per-pair quality statistics (``metrics.quality.pair_stats``) of one pair block, grouped by
    (product, defect); a Ray task, so the images are measured where the block lives."""
    from defectforge.evaluate.metrics import pair_stats

    if not isinstance(block, dict) or "product" not in block:  # an empty block (all rows filtered out)
        return {}
    products, defects = np.asarray(block["product"]).astype(str), np.asarray(block["defect"]).astype(str)
    out = {}
    for key in sorted(set(zip(products.tolist(), defects.tolist()))):
        idx = np.flatnonzero((products == key[0]) & (defects == key[1]))
        out[key] = pair_stats([np.asarray(block["image"][i]) for i in idx], [np.asarray(block["mask"][i]) for i in idx],
                              train_thumbs.get(key))
    return out


def add_defect_quality(metrics: dict[str, Any], pair_refs: list[Any], real: dict[str, Any]) -> None:
    """Add the defect-quality metrics (``metrics/quality.py``) to ``fidelity_and_diversity``'s dict.

    Per (product, defect): generated pairs (measured block by block in Ray tasks) against the real
    defect pairs of the type (``real["reference"]``: mask area, contrast, |Laplacian|), and
    memorisation against the type's few-shot training images, with its real test images as the
    baseline. Products and overall report the mean over their types (like LPIPS and mask quality).
    """
    import ray

    from defectforge.cluster import outside_placement_group
    from defectforge.evaluate.metrics import (
        concat_stats,
        mean_over_types,
        nn_distance,
        pair_stats,
        quality_from_stats,
        thumbnails,
    )

    def by_type(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["defect"] != "good":
                out[(r["product"], r["defect"])].append(r)
        return out

    reference, test = by_type(real["reference"]), by_type(real["test"])
    thumbs = {k: thumbnails([r["image"] for r in v]) for k, v in by_type(real["few_shot"]).items()}
    task = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy=outside_placement_group())(_quality_block)
    thumbs_ref = ray.put(thumbs)
    generated: dict[tuple[str, str], list[dict[str, np.ndarray]]] = defaultdict(list)
    for part in ray.get([task.remote(thumbs_ref, ref) for ref in pair_refs]):
        for key, stats in part.items():
            generated[key].append(stats)
    quality = {}
    for key in sorted(generated):
        rows = reference.get(key, [])
        real_stats = pair_stats([r["image"] for r in rows], [r["mask"] for r in rows])
        test_nn = (nn_distance(thumbnails([r["image"] for r in test.get(key, [])]), thumbs[key])
                   if key in thumbs else None)
        quality[key] = quality_from_stats(concat_stats(generated[key]), real_stats, test_nn)
    for p, block in metrics["products"].items():
        for d, m in block["defects"].items():
            m.update(quality.get((p, d), {}))
        block["metrics"].update(mean_over_types(quality[(p, d)] for d in block["defects"] if (p, d) in quality))
    metrics["overall"].update(mean_over_types(q for (p, _), q in quality.items() if p in metrics["products"]))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------- segmentation
def _seg_task(condition: str, product: str, real_train: list[dict], test: list[dict], seed: int, steps: int,
              ratio: float, *pair_blocks: dict[str, np.ndarray]) -> dict[str, Any]:
    """One (product, condition, seed) segmentation run; the synthetic rows come from the pipeline's
    object-store blocks (never through the driver)."""
    from defectforge.evaluate.segmentation import run_one

    synthetic = []
    for block in pair_blocks:
        if not isinstance(block, dict) or "product" not in block:  # an empty block (all rows filtered out)
            continue
        for i in np.flatnonzero(np.asarray(block["product"]).astype(str) == product):
            synthetic.append({"image": np.asarray(block["image"][i]), "mask": np.asarray(block["mask"][i]),
                              "product": product, "defect": str(block["defect"][i]), "id": str(block["id"][i]),
                              "split": "synthetic"})
    out = run_one(condition, real_train, synthetic, test, seed=seed, steps=steps, val_fraction=SEG_VAL_FRACTION,
                  ratio=ratio)
    out["product"] = product
    out["info"].pop("val_rows", None)
    return out


def real_seg_key(train_rows: list[dict], test_rows: list[dict], seed: int, steps: int) -> str:
    """Content hash of everything a ``real`` (real-only) segmentation run depends on.

    Why: the real-only baseline is the same computation for every trial of a study (same rows,
    seed, steps; no generated pair enters it), and it is half of each trial's segmentation work.
    The key covers the rows' pixels, masks and names in order, the seed, the step count, the
    validation fraction, the source of the segmentation modules and the torch/numpy versions, so
    any change to what the run would compute gives a new key. The run is deterministic for these
    inputs on CPU (seeded, one thread per Ray task; ``test_segmentation`` checks a repeat is
    identical), so a cached result is the result a fresh run would give.
    """
    import hashlib

    import torch

    import defectforge.evaluate.seg_metrics as m1
    import defectforge.evaluate.segmentation as m2
    import defectforge.evaluate.segmenter as m3

    h = hashlib.blake2b(digest_size=20)
    for mod in (m1, m2, m3):
        h.update(Path(mod.__file__).read_bytes())
    h.update(f"{torch.__version__}|{np.__version__}|{seed}|{steps}|{SEG_VAL_FRACTION}".encode())
    for name, rows in (("train", train_rows), ("test", test_rows)):
        h.update(f"{name}:{len(rows)}".encode())
        for r in rows:
            img, mask = np.ascontiguousarray(r["image"]), np.ascontiguousarray(r["mask"])
            h.update(f"{r.get('product')}/{r.get('defect')}/{r.get('id')}/{r.get('split')}|{img.shape}|{mask.shape}"
                     .encode())
            h.update(img.tobytes())
            h.update(mask.tobytes())
    return h.hexdigest()


def _read_cached(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):  # a damaged entry is recomputed (and rewritten), never trusted
        return None
    return out if isinstance(out, dict) and out.get("condition") == "real" else None


def _write_cached(path: Path, result: dict[str, Any]) -> None:
    """Atomic (temp file + rename): two trials finishing the same baseline at once both write whole
    files, and a reader never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(result, default=float))
    os.replace(tmp, path)


def run_segmentation(real: dict[str, Any], products: list[str], pair_refs: list[Any], seeds: list[int],
                     steps: int, ratio: float, cache_dir: Path | None = None) -> dict[str, Any]:
    """Products x seeds x {real, real+synthetic} as Ray tasks; per product ``aggregate_runs``.

    With ``cache_dir`` the real-only runs are looked up by ``real_seg_key`` and only missing ones
    run (then stored): a sweep computes its baseline once instead of once per trial. A run read
    from the cache carries ``"cached": true`` in ``segmentation_runs.json``.
    """
    import ray

    from defectforge.cluster import outside_placement_group
    from defectforge.evaluate.segmentation import CONDITIONS, REAL, aggregate_runs

    task = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy=outside_placement_group())(_seg_task)
    refs, cached, to_store = [], [], []
    for p in products:
        train_rows = [r for r in real["few_shot"] + real["good_train"] if r["product"] == p]
        test_rows = [r for r in real["test"] if r["product"] == p]
        train_ref, test_ref = ray.put(train_rows), ray.put(test_rows)
        for seed in seeds:
            for cond in CONDITIONS:
                path = None
                if cond == REAL and cache_dir is not None:
                    path = cache_dir / f"{real_seg_key(train_rows, test_rows, seed, steps)}.json"
                    hit = _read_cached(path)
                    if hit is not None:
                        cached.append({**hit, "product": p, "cached": True})
                        continue
                refs.append(task.remote(cond, p, train_ref, test_ref, seed, steps, ratio, *pair_refs))
                to_store.append(path)
    runs = ray.get(refs)
    for path, r in zip(to_store, runs):
        if path is not None:
            _write_cached(path, {k: v for k, v in r.items() if k != "product"})
    by_product: dict[str, list[dict]] = defaultdict(list)
    for r in runs + cached:
        by_product[r["product"]].append(r)
    return {p: {**aggregate_runs(by_product[p]), "runs": [{k: v for k, v in r.items() if k != "product"}
                                                           for r in by_product[p]]} for p in products}


def _seg_overall(seg: dict[str, Any]) -> dict[str, float]:
    """Means over products of each product's mean (and gain std) per condition and metric."""
    from defectforge.evaluate.report import SEG_KEYS

    out: dict[str, float] = {}
    for cond, prefix in SEG_KEYS.items():
        metrics = next(iter(seg.values()))[cond]
        for m in metrics:
            out[f"{prefix}_{m}"] = float(np.mean([seg[p][cond][m]["mean"] for p in seg]))
            stds = [seg[p][cond][m]["std"] for p in seg]
            out[f"{prefix}_{m}_std"] = float(np.mean(stds)) if all(_finite(s) for s in stds) else math.nan
    return out


def config_sampling(cfg: ConfigBase, meta: dict[str, Any]) -> Any:
    """``SamplingOptions`` of ``cfg`` for the checkpoint ``meta`` describes: ``cfg.sampling``, and
    ``cfg.method``'s sampling-time fields when it configures the checkpoint's method (else the
    checkpoint's)."""
    from defectforge.methods.base import SamplingOptions, checkpoint_sampling

    mine = SamplingOptions.from_config(cfg)
    method = mine.method if cfg.method.name == meta["method"] else checkpoint_sampling(meta).method
    return SamplingOptions(sampler=mine.sampler, steps=mine.steps, guidance=mine.guidance, method=method)


def explicit_sampling(cfg: ConfigBase, base: ConfigBase, checkpoint: str | os.PathLike[str],
                      explicit: set[str] | frozenset[str] = frozenset()) -> Any:
    """The checkpoint's recorded options, with every sampling value on top that the user set: one
    ``cfg`` sets differently from ``base`` (the same command's config without the user's
    ``--config`` and overrides), or whose dotted key the user named (``explicit``, e.g.
    ``method.mask_guidance``: a value equal to the preset's is still the user's choice and beats
    the checkpoint's record). What ``defectforge evaluate`` samples with, so a checkpoint is
    evaluated as it was trained or swept unless the user says otherwise."""
    from defectforge.methods.base import SamplingOptions, checkpoint_sampling, read_checkpoint_meta

    mine, theirs = SamplingOptions.from_config(cfg), SamplingOptions.from_config(base)
    ck = checkpoint_sampling(read_checkpoint_meta(checkpoint))

    def chosen(key: str, a: Any, b: Any) -> bool:
        return a != b or key in explicit

    return SamplingOptions(
        sampler=mine.sampler if chosen("sampling.sampler", mine.sampler, theirs.sampler) else ck.sampler,
        steps=mine.steps if chosen("sampling.steps", mine.steps, theirs.steps) else ck.steps,
        guidance={**ck.guidance, **{k: v for k, v in mine.guidance.items()
                                    if chosen(f"sampling.guidance.{k}", v, theirs.guidance.get(k))
                                    or "sampling.guidance" in explicit}},
        method={**ck.method, **{k: v for k, v in mine.method.items()
                                if chosen(f"method.{k}", v, theirs.method.get(k))}})


def _seg_cache_dir(cfg: ConfigBase, run_root: Path) -> Path | None:
    """``<run_root>/cache/segmentation-real`` when caching is on and ``run_root`` is a run root
    defectforge claimed (a sweep's, or ``evaluate``'s own); never a folder it did not create."""
    from defectforge.paths import read_marker

    if not cfg.evaluation.cache_real_segmentation:
        return None
    marker = read_marker(run_root) if run_root.is_dir() else None
    if not marker or marker.get("kind") != "run-root":
        return None
    return run_root / "cache" / "segmentation-real"


# -------------------------------------------------------------------------------------- main
def evaluate(cfg: ConfigBase, checkpoint: str | os.PathLike[str] | None = None,
             generated: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] | None = None,
             summary_json: str | os.PathLike[str] | None = None, log_to_mlflow: bool = True,
             name: str | None = None, quiet: bool = False, overwrite: bool = False,
             sampling: Any = None) -> dict[str, Any]:
    """Evaluate a checkpoint (generating ``evaluation.n_per_defect`` pairs per defect type) or an
    existing folder / Parquet of pairs; returns the summary dict (also written as JSON).

    ``sampling`` (``SamplingOptions``): how the checkpoint samples. None = ``cfg.sampling`` with
    the sampling-time fields of ``cfg.method`` when ``cfg.method`` is the checkpoint's method (a
    sweep trial's ``u``), else the checkpoint's recorded options for those fields. The options
    used are in the summary (``sampling``)."""
    from defectforge.cluster import check_gpus_available, ensure_ray
    from defectforge.evaluate.pipeline import (
        PipelineSpec,
        conditions_rows,
        diversity_on_driver,
        generated_from_checkpoint,
        generated_from_path,
        run_pipeline,
    )
    from defectforge.evaluate.report import format_table, sample_grid, write_summary
    from defectforge.evaluate.report import log_to_mlflow as mlflow_log
    from defectforge.paths import claim_output, safe_component
    from defectforge.train.data import resolve_data_root

    if (checkpoint is None) == (generated is None):
        raise ConfigError("evaluate: pass exactly one of checkpoint (a generator dir) or generated (pairs)")
    # Absolute paths: Ray workers and actors do not run in this process's working directory.
    checkpoint = None if checkpoint is None else Path(checkpoint).resolve()
    generated = None if generated is None else Path(generated).resolve()
    if name is not None:  # it becomes a folder name under <run_root>/evaluations
        safe_component(name, "evaluation name (--name)", error=ConfigError)
    t_start = time.perf_counter()
    ev = cfg.evaluation
    method, context = _source_meta(checkpoint, generated)
    cfg = settle_extractors(cfg, log=(lambda *a, **k: None) if quiet else print)
    ev = cfg.evaluation
    extractor, lpips_name = check_extractors(cfg)  # before any generation work
    names = _metric_names(extractor, lpips_name)
    if checkpoint is not None:  # how it samples, checked before any Ray or generation work
        from defectforge.methods.base import check_checkpoint_sampling, read_checkpoint_meta

        meta = read_checkpoint_meta(checkpoint)
        sampling = sampling if sampling is not None else config_sampling(cfg, meta)
        check_checkpoint_sampling(meta, sampling)
    root = resolve_data_root(cfg)
    wanted = cfg.data.products
    if context is not None:
        products = [p for p in context["products"] if not wanted or p in wanted]
        resolution = int(context["resolution"])
    else:
        products, resolution = None, cfg.data.resolution

    run_root = Path(cfg.tracking.run_root).resolve()
    if not out:
        claim_output(run_root, "run-root", resumable=True, flag="tracking.run_root", legacy=("mlflow.db", "ray"))
    out_dir = Path(out).resolve() if out else run_root / "evaluations" / (
        name or f"evaluate-{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    # Before Ray starts: never mix with an earlier evaluation or write into a foreign folder.
    if generated is not None and Path(generated).resolve().is_relative_to(out_dir):
        # e.g. ``--generated E/artifacts/pairs --out E``: the evaluation would delete its own input
        raise ValueError(f"--generated {generated} lies inside the evaluation's output folder {out_dir}, which the "
                         "evaluation replaces: give another --out")
    claim_output(out_dir, "evaluate", overwrite=overwrite, flag="--out" if out else "evaluation folder")
    check_gpus_available(ev.num_gpus_per_actor, "evaluation.num_gpus_per_actor")
    artifacts = out_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)

    ensure_ray()
    import ray.data

    # Ray Data's live progress bars flood logs and job output; the pipeline prints its own timings.
    ray.data.DataContext.get_current().enable_progress_bars = not quiet and sys.stdout.isatty()
    spec = PipelineSpec(extractor=ev.feature_extractor, weights_dir=ev.weights_dir,
                        lpips_kind="standard" if ev.feature_extractor == "standard" else "randnet",
                        num_actors=ev.num_actors, num_gpus_per_actor=ev.num_gpus_per_actor,
                        batch_size=cfg.sampling.batch_size, seed=cfg.sampling.seed,
                        progress=not quiet and not sys.stdout.isatty())
    if checkpoint is not None:
        n_pairs = ev.n_per_defect * sum(len(context["classes"][p]) for p in products)
        spec.diversity_on_driver = diversity_on_driver(ev.diversity, n_pairs, resolution)
        spec.lpips_in_pass = ev.diversity == "auto"
    else:  # the folder's size is known once it is read: only an explicit choice applies
        spec.diversity_on_driver = ev.diversity == "driver"
    if checkpoint is not None:
        classes = {p: tuple(context["classes"][p]) for p in products}
        gen_ds = generated_from_checkpoint(
            checkpoint, conditions_rows(classes, ev.n_per_defect), spec, sampling, data_root=str(root),
            split=cfg.data.split.model_dump(mode="json"), reject_empty=cfg.sampling.reject_empty_masks,
            max_attempts=cfg.sampling.max_attempts)
    else:
        gen_ds, classes = generated_from_path(generated, wanted, resolution, spec.batch_size)
        products = list(classes)

    t_real = time.perf_counter()
    real = load_real(cfg, root, products, resolution)
    missing = [p for p in products if p not in real["index"].classes]
    if missing:
        raise DataError(f"data.products: {missing} are not in the dataset {root}")
    references = defaultdict(lambda: {"centres": [], "masks": []})
    for r in real["few_shot"]:
        references[f"{r['product']}/{r['defect']}"]["centres"].append(r["image"])
    for r in real["reference"]:
        references[f"{r['product']}/{r['defect']}"]["masks"].append(r["mask"])
    references = {k: {kk: np.stack(vv) if vv else None for kk, vv in v.items()} for k, v in references.items()}
    load_s = time.perf_counter() - t_real

    result = run_pipeline(gen_ds, real["reference"], references, spec, artifacts, classes=classes)
    metrics = fidelity_and_diversity(result, classes, names)
    t_quality = time.perf_counter()
    add_defect_quality(metrics, result.pair_refs, real)
    quality_s = time.perf_counter() - t_quality

    seg: dict[str, Any] = {}
    t_seg = time.perf_counter()
    # A product without defective test images (data.split.protocol=all, or a manifest that tests
    # none) has nothing to score a segmenter on: its downstream segmentation is skipped, not faked.
    seg_skipped = {p: f"no defective test image (data.split.protocol={cfg.data.split.protocol})"
                   for p in metrics["products"] if not any(r["product"] == p and r["defect"] != "good"
                                                           for r in real["test"])}
    # A zero-shot product (data.split.zero_shot) has no defective training image: the real-only
    # segmenter has no defect to learn, and neither segmenter a validation defect to pick its model on.
    # The validation carve needs 2 defective training images of one type (one stays in train), so a
    # split with fewer (data.split first-k with k = 1) is skipped too, before any segmentation starts.
    from defectforge.evaluate.segmentation import can_carve_validation

    for p in metrics["products"]:
        few_shot = [r for r in real["few_shot"] if r["product"] == p and r["defect"] != "good"]
        if p in seg_skipped or can_carve_validation(few_shot):
            continue
        seg_skipped[p] = ("no defective training image (data.split.zero_shot)" if not few_shot else
                          "fewer than 2 defective training images of every defect type (the validation carve "
                          f"needs 2 of one type; data.split.protocol={cfg.data.split.protocol})")
    if ev.segmentation and seg_skipped and not quiet:
        print("[evaluate] downstream segmentation skipped for "
              + "; ".join(f"{p}: {why}" for p, why in seg_skipped.items()), flush=True)
    if ev.segmentation and len(seg_skipped) < len(metrics["products"]):
        seg = run_segmentation(real, [p for p in metrics["products"] if p not in seg_skipped], result.pair_refs,
                               list(range(ev.seg_seeds)), ev.seg_steps, ev.synthetic_ratio,
                               cache_dir=_seg_cache_dir(cfg, run_root))
        for p, s in seg.items():
            metrics["products"][p]["segmentation"] = {k: s[k] for k in ("seeds", "real", "real+synthetic", "gain",
                                                                        "std")}
    seg_s = time.perf_counter() - t_seg

    summary: dict[str, Any] = {
        "method": method, "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "generated": str(Path(generated).resolve()) if generated else None, "data": str(root),
        "extractor": extractor, "lpips": lpips_name, "metric_names": names,
        "standard_metrics": extractor == "inception",
        "n_generated": result.n_generated, "n_per_defect": ev.n_per_defect if checkpoint else None,
        "split": cfg.data.split.model_dump(mode="json"),
        "sampling": sampling.to_json() if checkpoint is not None else None,
        "overall": metrics["overall"], "products": metrics["products"],
        "segmentation": (_seg_overall(seg) | {"seeds": list(range(ev.seg_seeds)), "steps": ev.seg_steps,
                                              "synthetic_ratio": ev.synthetic_ratio,
                                              "real_runs_cached": sum(bool(r.get("cached")) for s in seg.values()
                                                                      for r in s["runs"]),
                                              "std": "sample std over seeds (ddof=1)"}) if seg else {},
        "segmentation_skipped": seg_skipped if ev.segmentation else {},
        "artifacts": {"dir": str(out_dir), "pairs": str(result.pairs_path), "features": str(result.features_path)},
        "timings": {**result.timings, "load_real_s": load_s, "quality_s": quality_s, "segmentation_s": seg_s},
        "mlflow_run_id": None,
    }
    table = format_table(summary)
    grid = sample_grid(_grid_generated(result.pair_refs), _grid_real(real["reference"]),
                       artifacts / "sample_grid.png")
    (artifacts / "table.txt").write_text(table + "\n")
    if seg:
        (artifacts / "segmentation_runs.json").write_text(json.dumps(
            {p: s["runs"] for p, s in seg.items()}, indent=2, default=float))
    summary["timings"]["total_s"] = time.perf_counter() - t_start
    summary_path = Path(summary_json) if summary_json else out_dir / "summary.json"
    write_summary(summary, summary_path)
    if log_to_mlflow:
        from defectforge import tracking

        summary["mlflow_run_id"] = mlflow_log(
            cfg.to_dict(), summary, cfg.tracking.run_root, cfg.tracking.uri,
            tracking.experiment_name(method, cfg.tracking.experiment),
            name or tracking.run_name("evaluate", method, products),
            {"pairs": result.pairs_path, "features": result.features_path, "grid": grid,
             "table": artifacts / "table.txt", "summary": summary_path,
             "segmentation": artifacts / "segmentation_runs.json"},
            cfg.tracking.timeout_s,
            tags={"defectforge.method": method, "defectforge.products": ",".join(products),
                  "defectforge.source": str(checkpoint or generated)})
        write_summary(summary, summary_path)
    if not quiet:
        print(table, flush=True)
        print(f"[evaluate] summary: {summary_path}", flush=True)
    return summary


def _source_meta(checkpoint: Any, generated: Any) -> tuple[str, dict[str, Any] | None]:
    """(method name, generator context JSON or None) of what is evaluated."""
    from defectforge.methods.base import read_checkpoint_meta

    if checkpoint is not None:
        meta = read_checkpoint_meta(checkpoint)
        return meta["method"], meta["context"]
    info = Path(generated) / "generation.json"
    if Path(generated).is_dir() and info.is_file():
        ckpt = json.loads(info.read_text()).get("checkpoint")
        try:
            return read_checkpoint_meta(ckpt)["method"], None
        except Exception:  # the checkpoint may live elsewhere now: the pairs are still evaluable
            pass
    return "generated", None


def _grid_generated(pair_refs: list[Any], per_group: int = 4) -> dict[tuple[str, str], list]:
    """A few generated pairs per (product, defect), fetched block by block until each group has enough."""
    import ray

    out: dict[tuple[str, str], list] = defaultdict(list)
    for ref in pair_refs:
        block = ray.get(ref)
        if not isinstance(block, dict) or "product" not in block:
            continue
        for i in range(len(block["product"])):
            key = (str(block["product"][i]), str(block["defect"][i]))
            if len(out[key]) < per_group:
                out[key].append((np.asarray(block["image"][i]), np.asarray(block["mask"][i])))
    return dict(out)


def _grid_real(rows: list[dict[str, Any]], per_group: int = 4) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = defaultdict(list)
    for r in rows:
        if len(out[(r["product"], r["defect"])]) < per_group:
            out[(r["product"], r["defect"])].append((r["image"], r["mask"]))
    return dict(out)
