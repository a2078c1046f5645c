"""The evaluation pipeline on Ray Data: ONE dataset, ONE map pass.

Shape of one run::

    conditions blocks (product, defect, index, block; one block per map task, whole generation
      batches, more for a big evaluation: ``BLOCK_MAX_BYTES``); the real reference rows in shares
      in the object store, share k featurised by the task of block k (``real_shards``)
        | CPU: map_batches(eval_block, TaskPoolStrategy(num_actors), batch_size=None)
        |   generator, feature extractor cached per Ray worker process (reused by later evaluations)
        | GPU: map_batches(EvalActor, ActorPoolStrategy(num_actors)): loaded once per actor
        |   generate -> features + logits (+ LPIPS embeddings of generated images: ``lpips_in_pass``)
        |   -> the block's Parquet files (<artifacts>/pairs/, <artifacts>/features/; ``write_parts``)
        |   (this dataset's own context turns Ray Data's per-operator reservation off: with it, the
        |   one map operator ran one task at a time on 2 CPUs)
        v   output blocks stream to the driver as object refs (iter_internal_ref_bundles)
    per output block (``blocks.split_block``): the generated rows' pair columns as a numpy dict in
        the object store (``PipelineResult.pair_refs``) and every row's feature row for the driver;
        in the driver for a small evaluation, else as a Ray task next to the block (pixels never
        travel to the driver)
    driver: feature rows -> GaussianStats per (source, product, defect) (FID), KID / IS inputs
    one Ray task per level (group, product, overall; ``level_fidelity``): FID, KID, IS, running
        on the cluster while the driver does the next step
    one Ray task per (product, defect): LPIPS, IC-LPIPS, mask quality, from the pair blocks
        (a small evaluation: from the embeddings made in the pass, ``lpips_in_pass``; or, with
        ``evaluation.diversity=driver``, the same function in the driver: ``diversity_on_driver``)

An existing folder (MVTec layout, as ``defectforge generate`` writes) or Parquet file of generated
pairs replaces the conditions blocks: the folder's files are decoded by Ray tasks (``decode_refs``)
and go, with the real rows as blocks of their own (a ``union``), through the same map tasks for
their features.

Where the time went before (issue 12, profile on this 2-CPU machine): a generator pool feeding a
feature pool, a second execution with a third pool for the real images, ``materialize`` +
``select_columns`` + two ``write_parquet`` executions, a repartition + hash-shuffle aggregation for
the FID statistics, and a fresh LPIPS model per diversity task. Each actor pool and each fresh
worker pays seconds of imports (torch, torchvision, the metric stack) before its first row; each
execution pays scheduling and, for the shuffle, dozens of tasks. What remains is the work itself.

Why the FID statistics are summed on the driver and not by a distributed aggregation: KID needs
every feature row in one place anyway (and IS every logit row), so the rows come to the driver in
any case; a shuffle only added tasks. Only feature rows travel there (D floats + C logits per
image), never pixels: the pixels stay in the object store (``pair_refs``) and are read by the
diversity and segmentation tasks where they run. (Except in a small evaluation, at most 64 MiB of
generated pixels: ``diversity_on_driver``, whose blocks the driver splits itself.)

Then (issue 12, second round): an actor pool's actors are fresh processes that die with their
evaluation, so every evaluation paid ``import torch`` (~1.4 s here) again; CPU map tasks run on
Ray's reused workers, which cache their models (``actors.eval_block``), so only a cluster's first
evaluation pays it.

Then (issue 12, third round, 2026-12-02, 384 pairs on 2 CPUs, ratio to a one-thread loop 0.99 ->
0.52-0.58 with FID/KID/IS counted on both sides): Ray Data's per-operator resource reservation ran the
map tasks one at a time (off for this dataset); the driver did ~1.4 s of serial work after the pass
(LPIPS backbone over every image, float64 copies for the distance matrices, six matrix square
roots): the LPIPS embeddings now come out of the map tasks, the distance matrices are one matrix
product on embeddings, and the diversity groups and FID/KID/IS run as tasks on the warm workers
while the driver waits; two blocks per map task instead of four, one real block per task.

Then (issue 12, fourth round, 2026-12-07, same measurement, median ratio 0.55-0.59 -> 0.45): a
``finish_block`` task per output block wrote its Parquet files and split pixels from feature rows
(~40 ms of a shared core each, plus a scheduling round), and every extra wave of map tasks cost up
to 0.1 s of Ray Data's completion polling. Now the map tasks write their own files, a small
evaluation splits its blocks in the driver, the real rows ride with the conditions blocks instead
of being blocks of their own, and there is one block per map task.

Scaling out: the map tasks (actors on GPUs) are the unit of parallelism. On a cluster,
``evaluation.num_actors`` of them (each ``num_gpus_per_actor`` GPUs or up to one CPU) run on
whichever nodes have room; the
conditions blocks are spread over them by Ray Data's streaming executor, and blocks stay in the
object store of the node that made them until a diversity / segmentation task on some node reads
them. The driver's share grows with the number of images only by their feature rows (past
``DRIVER_DIVERSITY_MAX_BYTES`` of generated pixels; below it the driver splits the blocks).
There is one conditions block per map task (until a block would pass ``BLOCK_MAX_BYTES``), so on
more nodes ``evaluation.num_actors`` sets both how many tasks run and how finely the conditions
are cut.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectforge.cluster import outside_placement_group
from defectforge.evaluate.actors import (
    GENERATED,
    REAL,
    EvalActor,
    decode_refs,
    diversity_of_group,
    eval_block,
    warm_diversity,
)
from defectforge.evaluate.blocks import FEATURE_COLUMNS, PAIR_COLUMNS, split_block  # noqa: F401 (re-exported)
from defectforge.evaluate.metrics import GaussianStats


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
    diversity_on_driver: bool = False  # a small evaluation: see ``diversity_on_driver`` below
    lpips_in_pass: bool = False  # evaluation.diversity=auto: see ``lpips_in_pass`` below
    progress: bool = False  # a line per finished block and per generation batch; Ray Data's bars need a terminal


# Generated pixels (images + masks) up to which an evaluation counts as small (``diversity_on_driver``).
DRIVER_DIVERSITY_MAX_BYTES = 64 * 2**20


# LPIPS embeddings made in the pass, at most this many bytes in all (``lpips_in_pass``).
PASS_LPIPS_MAX_BYTES = 256 * 2**20


def lpips_in_pass(spec: PipelineSpec, n_rows: int, resolution: int) -> bool:
    """Whether the map tasks compute the generated images' LPIPS embeddings (``EvalActor``'s
    ``lpips``), so that the per-group diversity tasks only compare them.

    Why: for a small evaluation (``diversity_on_driver``) that stage ran in the driver after the
    pass, on one core, with the LPIPS backbone over every generated image: 1.0 s of the 384-pair
    evaluation's 3.1 s here (issue 12, 2026-12-02), while the map tasks' cores waited. In the pass
    the backbone runs on every map task's core; the groups then go to Ray tasks on the same warm
    workers (their LPIPS model is cached there), beside the FID/KID/IS tasks: the driver only
    waits (384 pairs, 2 map tasks: ratio to the plain loop 0.62 with the groups in the driver,
    0.52-0.58 as tasks). Only for ``evaluation.diversity=auto`` (``spec.lpips_in_pass``; ``driver``
    keeps everything in the driver) and only when the embeddings are small enough to ship
    (``PASS_LPIPS_MAX_BYTES``; AlexNet LPIPS at 64 px: 20 762 floats, 81 KiB per image; at 256 px
    ~2 MiB). A big evaluation's tasks compute their embeddings from the pair blocks where they run."""
    if not (spec.lpips_in_pass and spec.diversity_on_driver) or n_rows <= 0:
        return False
    return n_rows * _lpips_dim(spec.lpips_kind, spec.weights_dir, resolution) * 4 <= PASS_LPIPS_MAX_BYTES


@functools.lru_cache(maxsize=8)
def _lpips_dim(kind: str, weights_dir: str | None, resolution: int) -> int:
    """Length of one image's LPIPS embedding at ``resolution`` (one forward pass of a black image)."""
    from defectforge.evaluate.actors import cached_lpips

    black = np.zeros((1, resolution, resolution, 3), np.uint8)
    return int(cached_lpips(kind, weights_dir, "cpu").features(black).shape[1])


# Blocks of conditions rows per concurrent map task (``generated_from_checkpoint``'s docstring says why 1).
BLOCKS_PER_WORKER = 1

# At most this many bytes of generated pixels (RGB + mask) per conditions block: Ray Data's default
# target block size. A big evaluation is then cut into more blocks than map tasks, so no task holds
# a gigabyte of pixels (10 000 pairs at 256 px over 2 tasks would be ~1.3 GB each).
BLOCK_MAX_BYTES = 128 * 2**20


def diversity_on_driver(mode: str, n_pairs: int, resolution: int) -> bool:
    """Whether an evaluation is small: its diversity stage (LPIPS, IC-LPIPS, mask quality per
    group) does not run as plain per-group tasks over the pair blocks.

    ``tasks``: one Ray task per (product, defect), anywhere on the cluster, each computing its
    images' LPIPS embeddings: the path that scales out. ``driver``: in this process, reading the
    pair blocks from the object store. ``auto`` (``evaluation.diversity``'s default): small when
    the generated pixels are at most ``DRIVER_DIVERSITY_MAX_BYTES`` (64 MiB: 1 000+ pairs at
    128 px), else tasks. A small ``auto`` evaluation has the map tasks make the LPIPS embeddings
    (``lpips_in_pass``) and its group tasks, on the same warm workers, only compare them; if the
    embeddings would be too big to ship it runs in this process as ``driver`` does. Why not plain
    tasks for a small evaluation: a fresh worker imports torch, torchvision and LPIPS before its
    first group (5.2 s of a 96-pair evaluation's 13.1 s here, measured with ``jobs/benchmark.py
    eval``), and the work itself is under a second. In a sweep trial the evaluating process is the
    trial's evaluation task, which asks Ray for no CPU (``sweep/runner.py``): the group and
    FID/KID/IS tasks (1 CPU each, a fraction of a second) queue for a CPU like the trial's map
    and segmentation tasks; in ``driver`` mode the diversity runs unreserved in that process.
    """
    if mode not in ("auto", "driver", "tasks"):
        raise ValueError(f"evaluation.diversity: unknown mode {mode!r} (auto | driver | tasks)")
    if mode != "auto":
        return mode == "driver"
    return n_pairs * resolution * resolution * 4 <= DRIVER_DIVERSITY_MAX_BYTES


@dataclass
class GeneratorSource:
    """Conditions rows to generate from, and how ``EvalActor`` loads the generator.

    Generation happens inside the evaluation's one actor pass (``run_pipeline``), not in a pool of
    its own: this is only the input and the actors' constructor arguments.
    """

    conditions: Any                # Ray Dataset: blocks of whole generation batches
    generator: dict[str, Any]      # EvalActor(generator=...)
    n_rows: int = 0                # conditions rows (pairs to generate)
    n_blocks: int = 1              # conditions blocks; column ``block`` numbers them 0 .. n_blocks - 1


@dataclass
class PipelineResult:
    """Everything the metrics need; images stay in Ray's object store (``pair_refs``)."""

    stats: dict[tuple[str, str, str], GaussianStats]       # (source, product, defect)
    features: dict[tuple[str, str, str], np.ndarray]
    logits: dict[tuple[str, str, str], np.ndarray]
    diversity: list[dict[str, Any]]
    pair_refs: list[Any]      # ObjectRefs of numpy dicts: image, mask, product, defect, id, split
    pairs_path: Path
    features_path: Path
    n_generated: int
    timings: dict[str, float] = field(default_factory=dict)
    # ``level_fidelity`` per ``Level`` (run_pipeline's ``classes``); empty: the caller computes them
    fidelity: dict[Any, dict[str, float]] = field(default_factory=dict)
    lpips_in_pass: bool = False  # the diversity used LPIPS embeddings made by the map tasks
    kid_subsets: int = 100  # the KID subsets of ``fidelity``


def actor_cpus(num_actors: int, reserve: float = 1.0) -> float:
    """CPUs per actor: 1, or less so that ``num_actors`` actors leave ``reserve`` CPUs free.

    A reserve is needed only when the pass has Ray Data tasks upstream of the actors (decoding a
    folder of pairs): with every CPU held by actors those tasks would never run (DESIGN.md). The
    checkpoint path has none: its input blocks are already in the object store.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = (total - reserve) / max(num_actors, 1)
    return float(min(1.0, max(0.25, math.floor(share * 4) / 4)))


def _map_kwargs(spec: PipelineSpec, reserve: float) -> dict[str, Any]:
    """How the one pass maps its blocks: GPU actors, or CPU tasks on reused workers (``eval_block``)."""
    import ray

    if spec.num_gpus_per_actor > 0:
        return {"compute": ray.data.ActorPoolStrategy(size=spec.num_actors), "batch_format": "numpy",
                "num_gpus": spec.num_gpus_per_actor}
    return {"compute": ray.data.TaskPoolStrategy(size=spec.num_actors), "batch_format": "numpy",
            "num_cpus": actor_cpus(spec.num_actors, reserve)}


# ------------------------------------------------------------------------------------ sources
def conditions_rows(classes: dict[str, tuple[str, ...]], n_per_defect: int) -> list[dict[str, Any]]:
    """``n_per_defect`` rows per (product, defect), interleaved so every batch mixes types."""
    pairs = [(p, d) for p in classes for d in classes[p]]
    return [{"product": p, "defect": d, "index": i * len(pairs) + k}
            for i in range(n_per_defect) for k, (p, d) in enumerate(pairs)]


def generated_from_checkpoint(checkpoint: str | Path, rows: list[dict[str, Any]], spec: PipelineSpec,
                              sampling: Any = None, data_root: str | None = None,
                              split: dict[str, Any] | None = None, reject_empty: bool = True,
                              max_attempts: int = 4) -> GeneratorSource:
    """Conditions rows in blocks of whole generation batches of ``spec.batch_size`` rows (the same
    batches, seeded by their first row, as ``defectforge generate`` and a plain loop make) and the
    generator's arguments. ``sampling``: ``SamplingOptions`` for every batch (None = the
    checkpoint's recorded ones).

    Why one block per concurrent map task (``BLOCKS_PER_WORKER``): each block is a Ray Data task,
    and Ray Data notices a finished task only when all running ones are done or 0.1 s has passed
    (its executor's ``ray.wait(..., num_returns=len(active), timeout=0.1)``), so each further wave
    of tasks cost up to 0.1 s of idle cores (issue 12, 384 pairs on 2 CPUs: 24 blocks 1.05 s, 8
    blocks 0.65 s; 4 blocks + 2 real ones 0.66-0.77 s, 2 blocks carrying the real rows 0.53-0.62
    s). Blocks are whole generation batches, split as evenly as batches allow; the price is that
    a slow task's block cannot be rebalanced, and that the driver hears of a block only when it is
    done (the task prints a progress line per generation batch instead: ``spec.progress``). A big
    evaluation's blocks are capped at ``BLOCK_MAX_BYTES`` of pixels, so it gets more blocks."""
    import pyarrow as pa
    import ray

    from defectforge.methods.base import read_checkpoint_meta

    if not rows:
        raise ValueError("no conditions rows to generate from (no products / defect types?)")
    bs = spec.batch_size
    n_batches = math.ceil(len(rows) / bs)
    resolution = int(read_checkpoint_meta(checkpoint)["context"]["resolution"])
    max_batches = max(1, BLOCK_MAX_BYTES // (resolution * resolution * 4 * bs))
    per_block = bs * min(max_batches, math.ceil(n_batches / (BLOCKS_PER_WORKER * max(1, spec.num_actors))))
    # ``block``: which real reference rows the block's task also featurises (``run_pipeline``)
    tables = [pa.Table.from_pylist([dict(r, block=b) for r in rows[s:s + per_block]])
              for b, s in enumerate(range(0, len(rows), per_block))]
    return GeneratorSource(ray.data.from_arrow(tables), {
        "checkpoint": str(checkpoint), "seed": spec.seed, "batch_size": bs,
        "sampling": sampling.to_json() if sampling is not None else None, "data_root": data_root, "split": split,
        "reject_empty": reject_empty, "max_attempts": max_attempts}, n_rows=len(rows), n_blocks=len(tables))


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
    elif parquet is None and p.is_dir() and not _has_products(p) and any(p.glob("*.parquet")):
        parquet = p  # a folder of Parquet parts, e.g. an evaluation's own artifacts/pairs
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

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from defectforge.data.arrow import to_ray_dataset

    missing = sorted({"product", "defect", "id", "image", "mask"} - set(pads.dataset(str(path), format="parquet")
                                                                        .schema.names))
    if missing:  # e.g. an evaluation's artifacts/features folder given for its artifacts/pairs
        raise ValueError(f"--generated {path}: not a table of pairs (no column(s) {missing}; an evaluation's pairs "
                         "are in <out>/artifacts/pairs)")
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
        classes[product] = (tuple(json.loads(cfile.read_text())["classes"]) if cfile.is_file()
                            else tuple(sorted(found[product])))
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


# ------------------------------------------------------------------------------------ fidelity
Level = tuple  # (product, defect): one group; (product, None): a product; (None, None): overall


def products_with_pairs(classes: dict[str, tuple[str, ...]], generated: set[tuple[str, str]]) -> list[str]:
    """The products of ``classes`` with at least one generated (product, defect) group, in order:
    the products the product and overall levels report."""
    return [p for p in classes if any((p, d) in generated for d in classes[p])]


def fidelity_levels(classes: dict[str, tuple[str, ...]], generated: set[tuple[str, str]],
                    scope: str = "all") -> list[Level]:
    """The levels FID, KID and IS pool their rows over (``run.py``'s level conventions): each
    generated (product, defect) group; with ``scope="all"`` also each product with a generated
    group and the overall level (those products together)."""
    if scope not in ("all", "groups"):
        raise ValueError(f"fidelity scope: unknown {scope!r} (all | groups)")
    products = products_with_pairs(classes, generated)
    levels: list[Level] = [(p, d) for p in products for d in classes[p] if (p, d) in generated]
    if scope == "all":
        levels += [(p, None) for p in products] + [(None, None)]
    return levels


def level_match(level: Level, products: list[str]) -> Any:
    """The (product, defect) filter of a level: one group, one product's groups, or (overall) the
    groups of ``products`` (``products_with_pairs``). One predicate for the FID/KID/IS pools and
    ``run.fidelity_and_diversity``'s diversity means."""
    product, defect = level

    def match(p: str, d: str) -> bool:
        if product is None:
            return p in products
        return p == product and (defect is None or d == defect)

    return match


def pool_level(stats: dict, features: dict, logits: dict, level: Level, products: list[str]) -> tuple:
    """(generated stats, real stats, generated features, real features, generated logits) of one
    level, pooled over its groups in sorted order (None where the level has no rows)."""
    from defectforge.evaluate.actors import GENERATED, REAL

    match = level_match(level, products)

    def pooled(table: dict, source: str) -> np.ndarray | None:
        parts = [v for (s, p, d), v in sorted(table.items()) if s == source and match(p, d)]
        return np.concatenate(parts) if parts else None

    def merged(source: str) -> GaussianStats | None:
        out = None
        for (s, p, d), st in sorted(stats.items()):
            if s == source and match(p, d):
                out = st if out is None else out.merge(st)
        return out

    return (merged(GENERATED), merged(REAL), pooled(features, GENERATED), pooled(features, REAL),
            pooled(logits, GENERATED))


def level_fidelity(g: GaussianStats | None, r: GaussianStats | None, fg: np.ndarray | None, fr: np.ndarray | None,
                   lg: np.ndarray | None, kid_subsets: int = 100) -> dict[str, float]:
    """FID, KID and IS of one level (``pool_level``'s outputs), under generic names (``fid``,
    ``kid``, ``is``, ``is_std``, ``n_generated``, ``n_real``); NaN where a set is too small.

    A Ray task in ``run_pipeline`` (one per level, while the driver computes the diversity): the
    matrix square root of FID is the serial cost here (0.06 s at the stand-in's 256 features, tens
    of seconds at Inception's 2048), and levels are independent."""
    from defectforge.evaluate.metrics import fid_from_stats, inception_score_from_logits, kid

    m: dict[str, float] = {"n_generated": float(g.count if g else 0), "n_real": float(r.count if r else 0)}
    m["fid"] = fid_from_stats(g, r) if g and r and g.count >= 2 and r.count >= 2 else math.nan
    m["kid"] = (kid(fg, fr, num_subsets=kid_subsets) if fg is not None and fr is not None
                and len(fg) >= 2 and len(fr) >= 2 else math.nan)
    if lg is not None and len(lg):
        score = inception_score_from_logits(lg, splits=max(1, min(10, len(lg) // 10)))
        m["is"], m["is_std"] = score.mean, score.std
    return m


# ------------------------------------------------------------------------------------- the run
def block_order(features: dict[str, np.ndarray]) -> tuple:
    """Sort key of an output block (its feature rows): blocks with generated rows first, by their
    first row's id (conditions blocks hold consecutive indices, ids ``%05d``; a block's real share
    follows its pairs, and share k rides with block k, so this gives the input order of both),
    then blocks of real or decoded rows by their first (id, product, defect). If Ray Data slices
    an output block (over 1.5 x its target block size), a slice of real rows alone sorts with the
    real blocks: no longer the input order, but still the same order on every run, which is what
    KID's subsets need to be reproducible."""
    if not len(features["source"]):
        return (2,)
    first = [str(np.asarray(features[c])[0]) for c in ("source", "product", "defect", "id")]
    digits = first[3].isascii() and first[3].isdecimal()
    natural = (0, int(first[3]), "") if digits else (1, 0, first[3])
    return (0 if first[0] == GENERATED else 1, *natural, first[1], first[2])


def run_pipeline(generated: Any, real_rows: list[dict[str, Any]], references: dict[str, dict[str, np.ndarray]],
                 spec: PipelineSpec, artifacts: str | Path, classes: dict[str, tuple[str, ...]] | None = None,
                 fidelity_scope: str = "all", kid_subsets: int = 100) -> PipelineResult:
    """Features, FID statistics, KID/IS inputs and diversity for ``generated`` vs ``real_rows``.

    ``generated``: a ``GeneratorSource`` (``generated_from_checkpoint``) or a Ray Dataset of pairs
    (``generated_from_path``); ``real_rows``: the real reference set (defective images of the
    evaluated products); ``references``: ``"product/defect" -> {"centres", "masks"}`` for IC-LPIPS
    and mask quality. ``classes`` (product -> defect types): FID, KID and IS of every level of
    ``fidelity_levels(classes, ..., fidelity_scope)`` as Ray tasks, run while the driver computes
    the diversity (``PipelineResult.fidelity``); None leaves them to the caller.
    """
    import ray

    artifacts = Path(artifacts)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not real_rows:
        raise ValueError("no real reference images to compare the generated pairs with")
    real = [{"image": r["image"], "mask": r["mask"], "product": r["product"], "defect": r["defect"],
             "id": str(r["id"]), "split": str(r["split"]), "source": REAL} for r in real_rows]
    # At most one share of the real rows per concurrent map task: a real share's work is small
    # (features only).
    n_real = max(1, min(spec.num_actors, math.ceil(len(real) / spec.batch_size)))
    real_shards = None
    if isinstance(generated, GeneratorSource):
        # The real rows ride with the first conditions blocks (``EvalActor.__call__``'s
        # ``real_shards``) instead of being blocks of their own after a ``union``: each extra block
        # cost a task, and each wave of tasks up to 0.1 s of Ray Data's completion polling (its
        # executor waits on ALL running tasks with a 0.1-s timeout); issue 12, 384 pairs: pass
        # 0.66-0.77 s -> 0.54-0.61 s together with the writes moved into the map tasks.
        bounds = np.linspace(0, len(real), min(n_real, generated.n_blocks) + 1).astype(int)
        real_shards = [ray.put(real[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        inputs, generator, reserve = generated.conditions, generated.generator, 0.0
    else:  # pairs decoded by Ray tasks upstream of the actors: leave them a CPU
        inputs = generated.union(ray.data.from_items(real, override_num_blocks=n_real))
        generator, reserve = None, 1.0
    map_kwargs = _map_kwargs(spec, reserve)
    # Counted with the real rows: they ride in the same blocks and get a zero embedding each.
    embed = isinstance(generated, GeneratorSource) and lpips_in_pass(
        spec, generated.n_rows + len(real), int(np.asarray(real[0]["image"]).shape[0]))
    model_args = {"kind": spec.extractor, "weights_dir": spec.weights_dir, "num_gpus": spec.num_gpus_per_actor,
                  "generator": generator,
                  "lpips": {"kind": spec.lpips_kind, "weights_dir": spec.weights_dir} if embed else None}
    pairs_path, features_path = artifacts / "pairs", artifacts / "features"
    for folder in (pairs_path, features_path):  # a re-run must not mix old parts with new ones
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    # Each map task writes its own output's Parquet files (``blocks.write_parts``).
    call_args = {"real_shards": real_shards, "parts": (str(pairs_path), str(features_path)),
                 "progress": spec.progress}
    if spec.num_gpus_per_actor > 0:  # GPU: an actor pool, models loaded once per actor
        ds = inputs.map_batches(EvalActor, batch_size=None, fn_constructor_kwargs=model_args, fn_kwargs=call_args,
                                **map_kwargs)
    else:  # CPU: tasks on Ray's reused workers, models cached per worker process (``eval_block``)
        ds = inputs.map_batches(eval_block, batch_size=None, fn_kwargs={**model_args, **call_args}, **map_kwargs)
    if isinstance(generated, GeneratorSource):
        # One map operator over blocks already in the object store: let it use every slot it was
        # given. Ray Data's per-operator resource reservation (on by default; half the cluster split
        # between the operators) let the pass run ONE map task at a time on this 2-CPU machine
        # (issue 12, measured 2026-12-02: six 0.3 s tasks with TaskPoolStrategy(size=2) took 1.8 s,
        # 1.07 s without it). Set on this dataset's own context (a copy), not the process's. The
        # folder path keeps it: its decoding operator feeds the map tasks and must not starve.
        ds.context.op_resource_reservation_enabled = False
    # CPUs the actors leave idle prepare the diversity tasks meanwhile (imports + LPIPS model).
    idle = 0 if spec.num_gpus_per_actor > 0 or spec.diversity_on_driver else int(
        ray.available_resources().get("CPU", 0.0) - reserve - spec.num_actors * map_kwargs["num_cpus"])
    warm = ray.remote(num_cpus=1, scheduling_strategy=outside_placement_group())(warm_diversity)
    warming = [warm.remote(spec.lpips_kind, spec.weights_dir, 0.0) for _ in range(max(0, idle))]

    # A big evaluation splits each output block in a task next to it, so only feature rows come
    # here; a small one (``diversity_on_driver``: a few MiB of pixels) splits it here, which saves
    # a task and a scheduling round per block.
    split = ray.remote(num_returns=2, scheduling_strategy=outside_placement_group())(split_block)
    finished = []
    total_rows = len(real) + generated.n_rows if isinstance(generated, GeneratorSource) else 0
    rows_done = 0
    for bundle in ds.iter_internal_ref_bundles():  # streams while the actors work
        slices = getattr(bundle, "slices", None) or [None] * len(bundle.block_refs)
        for ref, meta, piece in zip(bundle.block_refs, bundle.metadata, slices):
            if meta.num_rows == 0:
                continue
            if spec.progress:
                rows_done += int(meta.num_rows)
                elapsed = time.perf_counter() - t0
                print(f"[evaluate] {rows_done}/{total_rows or '?'} rows through the pass (generated pairs and real "
                      f"references)  {rows_done / max(elapsed, 1e-9):.2f} rows/s  {elapsed:.0f} s", flush=True)
            bounds = (piece.start_offset, piece.end_offset) if piece is not None else (None, None)
            if spec.diversity_on_driver:
                pairs, feature_rows = split_block(ray.get(ref), *bounds)
                finished.append((ray.put(pairs) if pairs is not None else None, feature_rows))
            else:
                finished.append(split.remote(ref, *bounds))
    timings["actor_pass_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    stats: dict[tuple[str, str, str], GaussianStats] = defaultdict(GaussianStats)
    features: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    logits: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    pair_refs, n_generated = [], 0
    embeddings: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    remote = [i for i, (_, rows) in enumerate(finished) if isinstance(rows, ray.ObjectRef)]
    for i, rows in zip(remote, ray.get([finished[i][1] for i in remote])):
        finished[i] = (finished[i][0], rows)
    # Blocks finish in any order; the rows are taken in input order (KID's subsets and IS's splits
    # depend on the order of the rows, so the figures do not depend on which task finished first).
    finished.sort(key=lambda f: block_order(f[1]))
    for pairs_ref, block in finished:
        keys = list(zip(np.asarray(block["source"]).astype(str), np.asarray(block["product"]).astype(str),
                        np.asarray(block["defect"]).astype(str)))
        f, lg = np.asarray(block["features"], np.float64), np.asarray(block["logits"], np.float64)
        for key in dict.fromkeys(keys):  # each group of the block, in first-seen order
            rows = np.asarray([k == key for k in keys])
            stats[key].update(f[rows])
            features[key].append(f[rows])
            logits[key].append(lg[rows])
            if "lpips" in block and key[0] == GENERATED:
                embeddings[key[1:]].append((np.asarray(block["id"])[rows], np.asarray(block["lpips"])[rows]))
        n_pairs = sum(k[0] == GENERATED for k in keys)
        if n_pairs:  # the block has generated rows, so ``split_block`` returned their pair columns
            pair_refs.append(pairs_ref)
            n_generated += n_pairs
    if n_generated == 0:
        raise ValueError("the pipeline generated no pairs")
    features_of = {k: np.concatenate(v) for k, v in features.items()}
    logits_of = {k: np.concatenate(v) for k, v in logits.items()}
    timings["features_to_driver_s"] = time.perf_counter() - t1

    t3 = time.perf_counter()
    fidelity_refs: dict[Level, Any] = {}
    if classes is not None:  # on the cluster's CPUs, while the driver does the diversity below
        fid_task = ray.remote(num_cpus=1, scheduling_strategy=outside_placement_group())(level_fidelity)
        generated_groups = {k[1:] for k in features if k[0] == GENERATED}
        products = products_with_pairs(classes, generated_groups)
        fidelity_refs = {level: fid_task.remote(*pool_level(stats, features_of, logits_of, level, products),
                                                kid_subsets)
                         for level in fidelity_levels(classes, generated_groups, fidelity_scope)}
    # One Ray task per (product, defect): each reads the pair blocks from the object store and keeps
    # its group. Tasks release their CPU when done, unlike a hash shuffle feeding an actor pool,
    # which deadlocked when the pool's actor and the shuffle's tasks wanted the same two CPUs.
    groups = sorted({k[1:] for k in features if k[0] == GENERATED})

    def group_embeddings(p: str, d: str) -> tuple[np.ndarray, np.ndarray] | None:
        return (np.concatenate([i for i, _ in embeddings[(p, d)]]),
                np.concatenate([e for _, e in embeddings[(p, d)]])) if embed else None

    # Small and not embedded in the pass: here, with no worker start-up (``diversity_on_driver``);
    # else one task per group, from the embeddings the pass made (``lpips_in_pass``) or the images.
    if spec.diversity_on_driver and not embed:
        blocks = ray.get(pair_refs)
        diversity = [diversity_of_group(p, d, references, spec.lpips_kind, spec.weights_dir, 0.0, *blocks)
                     for p, d in groups]
    else:
        # Comparing embeddings made in the pass is a CPU matrix product: no GPU for those tasks
        # (a GPU task's worker exits after each call, so each group would rebuild LPIPS).
        gpus = 0.0 if embed else spec.num_gpus_per_actor
        task = ray.remote(num_cpus=1, num_gpus=gpus or None,
                          scheduling_strategy=outside_placement_group())(diversity_of_group)
        references_ref = ray.put(references)
        diversity = ray.get([task.remote(p, d, references_ref, spec.lpips_kind, spec.weights_dir,
                                         gpus, *pair_refs, embeddings=group_embeddings(p, d))
                             for p, d in groups])
    ray.get(warming)  # done long since; surfaces a failure to build the model
    timings["diversity_s"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    fidelity = dict(zip(fidelity_refs, ray.get(list(fidelity_refs.values()))))
    timings["fidelity_wait_s"] = time.perf_counter() - t4
    timings["pipeline_s"] = time.perf_counter() - t0
    return PipelineResult(
        stats=dict(stats),
        features=features_of,
        logits=logits_of,
        diversity=[{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in diversity],
        pair_refs=pair_refs, pairs_path=pairs_path, features_path=features_path,
        n_generated=int(n_generated), timings=timings, fidelity=fidelity, lpips_in_pass=bool(embed),
        kid_subsets=kid_subsets)
