"""The evaluation pipeline on Ray Data: conditions -> generator actors -> feature actors -> aggregation.

Shape of one run::

    conditions rows (product, defect, index)
        | map_batches(GenerateActor, ActorPool)
        v
    generated pairs (source="generated")         real reference rows (source="real")
        | map_batches(FeatureActor, ActorPool)       | map_batches(FeatureActor, ActorPool)
        v   materialize() (blocks stay in the object store, never on the driver)
        +--> generated pairs  -> Parquet  <artifacts>/pairs/
        +--> feature rows of both (union) -> Parquet  <artifacts>/features/
        +--> groupby(source, product, defect).aggregate(GaussianStatsAgg)  -> FID statistics
        +--> feature columns only -> KID (needs every feature) and IS (logits)
        +--> generated, one Ray task per (product, defect): LPIPS, IC-LPIPS, mask quality

An existing folder (MVTec layout, as ``defectforge generate`` writes) or Parquet file of generated
pairs replaces the first stage: the folder's files are decoded by Ray tasks (``decode_refs``).

Why two feature passes and not one over a union of both sets: filtering a union back apart leaves
empty blocks, whose empty schema breaks Ray 2.60's hash-shuffle reduce in ``map_groups``. CPU budget: every actor asks
for at most one CPU, and less when the cluster is small, so one CPU always stays free for the
read / filter / write tasks (else the streaming executor stalls, DESIGN.md).
"""

from __future__ import annotations

import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectforge.evaluate.actors import GENERATED, REAL, FeatureActor, GenerateActor, decode_refs, diversity_of_group
from defectforge.evaluate.aggregate import grouped_stats
from defectforge.cluster import outside_placement_group
from defectforge.evaluate.metrics import GaussianStats

PAIR_COLUMNS = ["image", "mask", "product", "defect", "id", "split"]
SHUFFLE_PARTITIONS = 4
FEATURE_COLUMNS = ["source", "product", "defect", "id", "features", "logits"]


@dataclass
class PipelineSpec:
    """What the pipeline runs with (plain data, so it is cheap to ship to actors)."""

    extractor: str                 # evaluation.feature_extractor: standard | randfeat
    weights_dir: str | None
    lpips_kind: str                # standard | randnet
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    batch_size: int = 8
    seed: int = 0


@dataclass
class PipelineResult:
    """Everything the metrics need; images stay in Ray's object store (``pair_refs``)."""

    stats: dict[tuple[str, str, str], GaussianStats]       # (source, product, defect)
    features: dict[tuple[str, str, str], np.ndarray]
    logits: dict[tuple[str, str, str], np.ndarray]
    diversity: list[dict[str, Any]]
    pair_refs: list[Any]                                    # ObjectRefs of generated-pair blocks
    pairs_path: Path
    features_path: Path
    n_generated: int
    timings: dict[str, float] = field(default_factory=dict)


def actor_cpus(num_actors: int, pools: int = 2) -> float:
    """CPUs per actor: 1, or less so that ``pools`` pools of ``num_actors`` leave one CPU free."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = (total - 1.0) / max(pools * num_actors, 1)
    return float(min(1.0, max(0.25, math.floor(share * 4) / 4)))


def _map_kwargs(spec: PipelineSpec, pools: int = 2) -> dict[str, Any]:
    import ray

    kwargs: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=spec.num_actors),
                              "batch_format": "numpy"}
    if spec.num_gpus_per_actor > 0:
        kwargs["num_gpus"] = spec.num_gpus_per_actor
    else:
        kwargs["num_cpus"] = actor_cpus(spec.num_actors, pools)
    return kwargs


# ------------------------------------------------------------------------------------ sources
def conditions_rows(classes: dict[str, tuple[str, ...]], n_per_defect: int) -> list[dict[str, Any]]:
    """``n_per_defect`` rows per (product, defect), interleaved so every batch mixes types."""
    pairs = [(p, d) for p in classes for d in classes[p]]
    return [{"product": p, "defect": d, "index": i * len(pairs) + k}
            for i in range(n_per_defect) for k, (p, d) in enumerate(pairs)]


def generated_from_checkpoint(checkpoint: str | Path, rows: list[dict[str, Any]], spec: PipelineSpec,
                              sample_kwargs: dict[str, Any] | None = None, data_root: str | None = None,
                              split: dict[str, Any] | None = None, reject_empty: bool = True,
                              max_attempts: int = 4, method_overrides: dict[str, Any] | None = None) -> Any:
    """Lazy dataset of generated pairs: conditions rows through ``GenerateActor`` actors."""
    import ray

    n_blocks = max(1, min(len(rows), math.ceil(len(rows) / spec.batch_size)))
    return ray.data.from_items(rows, override_num_blocks=n_blocks).map_batches(
        GenerateActor, batch_size=spec.batch_size,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "seed": spec.seed, "sample_kwargs": sample_kwargs,
                               "method_overrides": method_overrides, "data_root": data_root, "split": split,
                               "reject_empty": reject_empty, "max_attempts": max_attempts,
                               "num_gpus": spec.num_gpus_per_actor},
        **_map_kwargs(spec))


def generated_from_path(path: str | Path, products: list[str] | None, resolution: int,
                        batch_size: int = 16) -> tuple[Any, dict[str, tuple[str, ...]]]:
    """Lazy dataset of generated pairs from an MVTec-layout folder or a Parquet file/folder.

    Returns (dataset, classes per product). The folder's defect images are the pairs
    (``test/<defect>`` + ``ground_truth``); ``train/good`` and ``test/good`` are ignored.
    """
    import ray

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--generated {p}: no such file or folder")
    parquet = p if p.suffix == ".parquet" else None
    if parquet is None and p.is_dir() and not _has_products(p) and (p / "generated.parquet").exists():
        parquet = p / "generated.parquet"
    if parquet is not None:
        return _from_parquet(parquet, products, resolution)
    from defectforge.data.mvtec import scan_dataset

    index = scan_dataset(p, products)
    refs = [r for r in index.refs if not r.is_good]
    if not refs:
        raise FileNotFoundError(f"--generated {p}: no defect images (expected <product>/test/<defect>/*.png)")
    items = [{"product": r.product, "defect": r.defect, "id": r.id, "image_path": str(r.image_path),
              "mask_path": str(r.mask_path) if r.mask_path else ""} for r in refs]
    n_blocks = max(1, math.ceil(len(items) / batch_size))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks).map_batches(
        decode_refs, batch_size=batch_size, batch_format="numpy",
        fn_kwargs={"classes": {k: list(v) for k, v in index.classes.items()}, "resolution": resolution})
    return ds, {k: tuple(v) for k, v in index.classes.items()}


def _has_products(folder: Path) -> bool:
    return any((c / "test").is_dir() or (c / "train").is_dir() for c in folder.iterdir() if c.is_dir()) \
        or (folder / "test").is_dir()


def _from_parquet(path: Path, products: list[str] | None, resolution: int) -> tuple[Any, dict[str, tuple[str, ...]]]:
    """Sample rows of a Parquet file/folder written by ``data.arrow.write_parquet`` (e.g. generate.py's),
    decoded by Ray tasks (``data.arrow.to_ray_dataset``); only the label columns are read here."""
    import json

    import pyarrow.parquet as pq

    from defectforge.data.arrow import to_ray_dataset

    labels = pq.read_table(path, columns=["product", "defect"]).to_pylist()
    found: dict[str, set[str]] = defaultdict(set)
    for r in labels:
        if r["defect"] != "good" and (not products or r["product"] in products):
            found[r["product"]].add(r["defect"])
    if not found:
        raise FileNotFoundError(f"--generated {path}: no defect rows{' for ' + str(products) if products else ''}")
    classes: dict[str, tuple[str, ...]] = {}
    for product in sorted(found):
        cfile = (path.parent if path.is_file() else path) / product / "classes.json"
        classes[product] = tuple(json.loads(cfile.read_text())["classes"]) if cfile.is_file() else tuple(sorted(found[product]))
    ds = to_ray_dataset(path).map_batches(_keep_pairs, batch_format="numpy",
                                          fn_kwargs={"products": sorted(found), "resolution": resolution})
    return ds, classes


def _keep_pairs(batch: dict[str, np.ndarray], products: list[str], resolution: int) -> dict[str, np.ndarray]:
    """Defect rows of the wanted products, at ``resolution``, tagged as generated pairs."""
    from defectforge.data.mvtec import resize_pair

    keep = [i for i, (p, d) in enumerate(zip(batch["product"], batch["defect"])) if d != "good" and p in products]
    pairs = [resize_pair(np.asarray(batch["image"][i], np.uint8), np.asarray(batch["mask"][i], np.uint8), resolution)
             for i in keep]
    return {"image": np.stack([im for im, _ in pairs]) if pairs else np.zeros((0, resolution, resolution, 3), np.uint8),
            "mask": np.stack([m for _, m in pairs]) if pairs else np.zeros((0, resolution, resolution), np.uint8),
            "product": np.asarray([str(batch["product"][i]) for i in keep], dtype=object),
            "defect": np.asarray([str(batch["defect"][i]) for i in keep], dtype=object),
            "id": np.asarray([str(batch["id"][i]) for i in keep], dtype=object),
            "split": np.asarray(["synthetic"] * len(keep), dtype=object),
            "source": np.asarray([GENERATED] * len(keep), dtype=object)}


# ------------------------------------------------------------------------------------- the run
def run_pipeline(generated: Any, real_rows: list[dict[str, Any]], references: dict[str, dict[str, np.ndarray]],
                 spec: PipelineSpec, artifacts: str | Path) -> PipelineResult:
    """Features, FID statistics, KID/IS inputs and diversity for ``generated`` vs ``real_rows``.

    ``real_rows``: the real reference set (defective images of the evaluated products);
    ``references``: ``"product/defect" -> {"centres", "masks"}`` for IC-LPIPS and mask quality.
    """
    import ray

    artifacts = Path(artifacts)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    real = [{"image": r["image"], "mask": r["mask"], "product": r["product"], "defect": r["defect"],
             "id": str(r["id"]), "split": str(r["split"]), "source": REAL} for r in real_rows]
    real_ds = ray.data.from_items(real, override_num_blocks=max(1, math.ceil(len(real) / spec.batch_size)))
    feature_kwargs = dict(batch_size=spec.batch_size,
                          fn_constructor_kwargs={"kind": spec.extractor, "weights_dir": spec.weights_dir,
                                                 "num_gpus": spec.num_gpus_per_actor}, **_map_kwargs(spec))
    # Generated pairs stream from the generator actors into the feature actors in one execution.
    pairs_featured = generated.map_batches(FeatureActor, **feature_kwargs).materialize()
    timings["generate_and_features_s"] = time.perf_counter() - t0
    real_featured = real_ds.map_batches(FeatureActor, **feature_kwargs).materialize()
    timings["real_features_s"] = time.perf_counter() - t0 - timings["generate_and_features_s"]

    t1 = time.perf_counter()
    pairs = pairs_featured.select_columns(PAIR_COLUMNS).materialize()
    n_generated = pairs.count()
    if n_generated == 0:
        raise ValueError("the pipeline generated no pairs")
    pairs_path, features_path = artifacts / "pairs", artifacts / "features"
    for stale in (pairs_path, features_path):  # write_parquet appends; a re-run must not duplicate rows
        shutil.rmtree(stale, ignore_errors=True)
    pairs.write_parquet(str(pairs_path))
    feats = pairs_featured.select_columns(FEATURE_COLUMNS).union(
        real_featured.select_columns(FEATURE_COLUMNS)).materialize()
    feats.write_parquet(str(features_path))
    timings["write_parquet_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    # A few hash partitions: there are only (products x defect types x 2) groups, and Ray's
    # default of 200 partitions costs seconds of empty tasks on a small cluster.
    stats = grouped_stats(feats, "features", ("source", "product", "defect"), num_partitions=SHUFFLE_PARTITIONS)
    timings["fid_stats_s"] = time.perf_counter() - t2

    # KID needs every feature row and IS every logit row: feature columns only, never images.
    features: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    logits: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    for batch in feats.select_columns(["source", "product", "defect", "features", "logits"]).iter_batches(
            batch_size=1024, batch_format="numpy"):
        for s, p, d, f, lg in zip(batch["source"], batch["product"], batch["defect"], batch["features"],
                                  batch["logits"]):
            features[(str(s), str(p), str(d))].append(f)
            logits[(str(s), str(p), str(d))].append(lg)

    t3 = time.perf_counter()
    # One Ray task per (product, defect): each reads the pair blocks from the object store and keeps
    # its group. Tasks release their CPU when done, unlike a hash shuffle feeding an actor pool,
    # which deadlocked when the pool's actor and the shuffle's tasks wanted the same two CPUs.
    pair_refs = pairs.select_columns(["image", "mask", "product", "defect", "id"]).to_numpy_refs()
    groups = sorted({k[1:] for k in features if k[0] == GENERATED})
    task = ray.remote(num_cpus=1, num_gpus=spec.num_gpus_per_actor or None,
                      scheduling_strategy=outside_placement_group())(diversity_of_group)
    references_ref = ray.put(references)
    diversity = ray.get([task.remote(p, d, references_ref, spec.lpips_kind, spec.weights_dir,
                                     spec.num_gpus_per_actor, *pair_refs) for p, d in groups])
    timings["diversity_s"] = time.perf_counter() - t3
    timings["pipeline_s"] = time.perf_counter() - t0
    return PipelineResult(
        stats=stats,
        features={k: np.stack(v) for k, v in features.items()},
        logits={k: np.stack(v) for k, v in logits.items()},
        diversity=[{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in diversity],
        pair_refs=pairs.to_numpy_refs(), pairs_path=pairs_path, features_path=features_path,
        n_generated=int(n_generated), timings=timings)
