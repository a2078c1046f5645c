"""Callable classes for Ray Data's ``map_batches`` / ``map_groups`` (one instance per actor).

Why classes: a generator checkpoint, an Inception network or an LPIPS model is loaded once in
``__init__`` and then serves every batch the actor receives; a plain function would reload it per
batch. Batches are ``dict[str, np.ndarray]`` (``batch_format="numpy"``); images are uint8
N x H x W x 3, masks uint8 N x H x W, the sample contract of DESIGN.md.

Nothing here knows which method or dataset it serves: the generator comes from ``load_generator``,
normal images / masks for methods that need them from ``generate.ConditionSource``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GENERATED, REAL = "generated", "real"


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _get(value: Any) -> Any:
    """Resolve an ``ObjectRef`` passed as a constructor argument (large tables travel by reference)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class EvalActor:
    """One actor of the evaluation's single Ray Data pass: generation (if a checkpoint is given) AND
    features + class logits, with every model loaded once in ``__init__``.

    Why one class and not a generator pool feeding a feature pool: each actor is a fresh process that
    imports torch, torchvision and the metric stack before its first batch (seconds on a small
    machine, measured in the profile of issue 12); two pools paid that twice, a second Ray Data
    execution for the real images a third time. Here every block of the one dataset, conditions
    rows and real or already generated pairs alike, goes through the same actors.

    Batches (``batch_size=None``: one input block = one batch):

    * conditions rows (``product``, ``defect``, ``index``): one or more generation batches of
      ``batch_size`` rows, each seeded ``seed * 1_000_003 + its first index`` (``generate.sample_pairs``),
      so the pairs depend on the seed and the rows, not on which actor ran them; empty masks are
      redrawn. Output: the pairs (``source="generated"``) with their features.
    * pairs (``image``, ``mask``, ...; real references or decoded generated pairs): their features;
      real rows in a block of their own are returned without their pixels, which nothing
      downstream needs; real rows carried by a conditions block (``real_shards``; the block's
      number is its ``block`` column) keep them, since the block's columns are shared.

    With ``lpips`` (``{"kind", "weights_dir"}``), generated rows also get their LPIPS embeddings
    (column ``lpips``, ``LpipsDistance.features``): the diversity stage's per-image work, done here
    in parallel instead of after the pass in one process (``pipeline.lpips_in_pass``).
    """

    def __init__(self, kind: str, weights_dir: str | None = None, num_gpus: float = 0.0,
                 generator: dict[str, Any] | None = None, lpips: dict[str, Any] | None = None) -> None:
        from defectforge.evaluate.metrics import make_extractor

        self.extractor = make_extractor(kind, weights_dir, device=_device(num_gpus))
        self.gen = None
        if generator is not None:
            self._load_generator(num_gpus=num_gpus, **generator)
        self.lpips = cached_lpips(lpips["kind"], lpips["weights_dir"], _device(num_gpus)) if lpips else None

    def _load_generator(self, checkpoint: str, seed: int, num_gpus: float, sampling: dict[str, Any] | None = None,
                        data_root: str | None = None, split: dict[str, Any] | None = None, reject_empty: bool = True,
                        max_attempts: int = 4, batch_size: int | None = None) -> None:
        from defectforge.config import SplitConfig
        from defectforge.generate import ConditionSource
        from defectforge.methods.base import SamplingOptions, load_generator

        self.gen = load_generator(checkpoint, device=_device(num_gpus))
        # The evaluation's options (a sweep trial's u, sampler, steps), else the checkpoint's own.
        self.options = SamplingOptions.from_json(sampling) if sampling is not None else self.gen.default_sampling
        self.gen.sampling_config(self.options)  # fails here, naming the field, not mid-pass
        self.source = ConditionSource.for_generator(
            self.gen, data_root, SplitConfig.model_validate(split) if split else None, seed=seed)
        self.seed, self.reject_empty, self.max_attempts = seed, reject_empty, max_attempts
        self.batch_size = batch_size  # generation batch; a block may hold several (None: one per block)

    def _generate(self, batch: dict[str, np.ndarray], progress: str | None = None) -> dict[str, np.ndarray]:
        import time

        from defectforge.generate import GenerationPlan, sample_pairs

        if self.gen is None:
            raise ValueError("EvalActor got conditions rows but no generator checkpoint")
        index = np.asarray(batch["index"]).astype(np.int64)
        plan = GenerationPlan([str(p) for p in batch["product"]], [str(d) for d in batch["defect"]])
        step = self.batch_size or len(index)
        rows, t0 = [], time.perf_counter()
        for s in range(0, len(index), step):  # each generation batch seeded by its first row, as generate does
            part = GenerationPlan(plan.product[s:s + step], plan.defect[s:s + step])
            rows += sample_pairs(self.gen, part, self.seed * 1_000_003 + int(index[s]), batch_size=step,
                                 reject_empty=self.reject_empty, max_attempts=self.max_attempts, progress=False,
                                 source=self.source, options=self.options)[0]
            if progress and len(rows) < len(index):  # a block is one task: say how far it is
                elapsed = time.perf_counter() - t0
                print(f"[evaluate] {progress}: {len(rows)}/{len(index)} pairs generated, {elapsed:.0f} s, about "
                      f"{elapsed / len(rows) * (len(index) - len(rows)):.0f} s left", flush=True)
        return {
            "image": np.stack([r["image"] for r in rows]),
            "mask": np.stack([r["mask"] for r in rows]),
            "product": np.asarray(plan.product),
            "defect": np.asarray(plan.defect),
            "id": np.asarray([f"{i:05d}" for i in index]),
            "split": np.asarray(["synthetic"] * len(rows)),
            "source": np.asarray([GENERATED] * len(rows)),
        }

    def __call__(self, batch: dict[str, np.ndarray], real_shards: list[Any] | None = None,
                 parts: tuple[str, str] | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """One input block -> one output block. ``real_shards``: ObjectRefs of lists of real
        reference rows; a conditions block numbered k (column ``block``) also computes the
        features of shard k, returned as rows after its pairs (``source="real"``, with their
        pixels, since a block's columns are shared). ``parts``: (pairs folder, features folder)
        the output is written to (``blocks.write_parts``). ``progress``: a line per generation batch
        (the block's task prints it; Ray shows worker output in the driver's)."""
        batch = dict(batch)
        block = np.asarray(batch.pop("block", []))
        label = f"conditions block {int(block[0])}" if progress and len(block) else None
        out = self._evaluate(batch, keep_real_pixels=False, progress=label)
        if real_shards and len(block) and int(block[0]) < len(real_shards):
            out = _concat(out, self._evaluate(real_batch(_get(real_shards[int(block[0])])), keep_real_pixels=True))
        if parts is not None:
            from defectforge.evaluate.blocks import write_parts

            write_parts(out, *parts)
        return out

    def _evaluate(self, batch: dict[str, np.ndarray], keep_real_pixels: bool,
                  progress: str | None = None) -> dict[str, np.ndarray]:
        out = self._generate(batch, progress) if "index" in batch else dict(batch)
        images = np.asarray(out["image"])
        if len(images):
            out["features"] = self.extractor.features(images).astype(np.float64)
            out["logits"] = self.extractor.logits(images).astype(np.float64)
        else:  # a block emptied by an upstream filter
            out["features"] = out["logits"] = np.zeros((0, 0), np.float64)
        if self.lpips is not None and len(images) and str(out["source"][0]) == GENERATED:
            out["lpips"] = self.lpips.features(images).cpu().numpy()
        if len(images) and str(out["source"][0]) == REAL and not keep_real_pixels:
            out = {k: v for k, v in out.items() if k not in ("image", "mask")}  # not needed downstream
        return out


def real_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Real reference rows (``run_pipeline``'s dicts) -> a numpy batch with the pairs' columns."""
    batch = {c: np.stack([np.asarray(r[c]) for r in rows]) for c in ("image", "mask")}
    batch.update({c: np.asarray([str(r[c]) for r in rows], dtype=object)
                  for c in ("product", "defect", "id", "split", "source")})
    return batch


def _concat(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of ``second`` after those of ``first``, in ``first``'s columns; a column ``second`` lacks
    (``lpips``: generated rows only) is filled with zeros, which nothing reads for those rows."""
    n = len(second["source"])
    out = {}
    for c, v in first.items():
        v = np.asarray(v)
        w = np.asarray(second[c]) if c in second else np.zeros((n,) + v.shape[1:], v.dtype)
        out[c] = np.concatenate([v, w])
    return out


_EXTRACTORS: dict[tuple[str, str | None, str], Any] = {}
_WORKER: dict[str, Any] = {}  # one slot: {"key": ..., "actor": EvalActor}


def eval_block(batch: dict[str, np.ndarray], kind: str, weights_dir: str | None = None, num_gpus: float = 0.0,
               generator: dict[str, Any] | None = None, lpips: dict[str, Any] | None = None,
               real_shards: list[Any] | None = None, parts: tuple[str, str] | None = None,
               progress: bool = False) -> dict[str, np.ndarray]:
    """``EvalActor.__call__`` as a Ray Data *task* whose models live in the worker process.

    Why (issue 12): an actor pool's actors are fresh processes, created per evaluation and gone
    after it; each paid ~1.4 s of ``import torch`` plus the metric stack and its models before its
    first block, more than the whole work of a 96-pair evaluation in a warm process. Ray keeps
    task workers alive between tasks of the same job (a sweep's trials are one job), so the
    feature extractor is built once per worker process and the generator once per checkpoint
    (keyed by its files' SHA-256, so a retrained checkpoint at the same path is reloaded): the
    second and later evaluations on a cluster start at once. On GPUs the pipeline keeps the actor
    pool, because Ray ends a GPU task's worker after each call unless told otherwise and a cached
    model would hold GPU memory in an idle process.
    """
    import json

    from defectforge.evaluate.metrics import make_extractor
    from defectforge.methods.base import read_checkpoint_meta

    device = _device(num_gpus)
    ekey = (kind, weights_dir, device)
    sha = read_checkpoint_meta(generator["checkpoint"])["sha256"] if generator is not None else None
    key = json.dumps([ekey, generator, sha, lpips], sort_keys=True, default=str)
    if _WORKER.get("key") != key:
        _WORKER.clear()  # at most one generator per worker: a sweep's old trials' models go
        if ekey not in _EXTRACTORS:
            _EXTRACTORS[ekey] = make_extractor(kind, weights_dir, device=device)
        actor = EvalActor.__new__(EvalActor)  # EvalActor.__init__, with the cached extractor
        actor.extractor, actor.gen = _EXTRACTORS[ekey], None
        if generator is not None:
            actor._load_generator(num_gpus=num_gpus, **generator)
        actor.lpips = cached_lpips(lpips["kind"], lpips["weights_dir"], device) if lpips else None
        _WORKER.update(key=key, actor=actor)
    return _WORKER["actor"](batch, real_shards=real_shards, parts=parts, progress=progress)


def decode_refs(batch: dict[str, np.ndarray], classes: dict[str, list[str]], resolution: int) -> dict[str, np.ndarray]:
    """Rows of file paths -> sample rows; runs as Ray tasks so decoding never happens on the driver."""
    from pathlib import Path

    from defectforge.data.mvtec import load_sample
    from defectforge.data.sample import SampleRef

    rows = []
    for product, defect, sid, image_path, mask_path in zip(batch["product"], batch["defect"], batch["id"],
                                                           batch["image_path"], batch["mask_path"]):
        ref = SampleRef(str(product), str(defect), str(sid), "test", Path(str(image_path)),
                        Path(str(mask_path)) if str(mask_path) else None)
        rows.append(load_sample(ref, tuple(classes[ref.product]), resolution))
    return {
        "image": np.stack([r["image"] for r in rows]), "mask": np.stack([r["mask"] for r in rows]),
        "product": np.asarray([r["product"] for r in rows]), "defect": np.asarray([r["defect"] for r in rows]),
        "id": np.asarray([r["id"] for r in rows]), "split": np.asarray(["synthetic"] * len(rows)),
        "source": np.asarray([GENERATED] * len(rows)),
    }


_LPIPS: dict[tuple[str, str | None, str], Any] = {}


def cached_lpips(kind: str, weights_dir: str | None, device: str) -> Any:
    """The LPIPS model of this worker process, built on first use.

    Why a process-level cache: the diversity runs as one Ray task per (product, defect), and Ray
    runs a caller's queued tasks in the same leased worker; rebuilding LPIPS (and re-reading
    its weights) per task cost ~0.6 s each in the profile of issue 12. The model is read-only here.
    """
    key = (kind, weights_dir, device)
    if key not in _LPIPS:
        from defectforge.evaluate.metrics import build_lpips

        _LPIPS[key] = build_lpips(kind, weights_dir, device=device)
    return _LPIPS[key]


def warm_diversity(kind: str, weights_dir: str | None, num_gpus: float) -> str:
    """Build this worker's LPIPS model (``cached_lpips``) ahead of the diversity tasks.

    Run as a Ray task on a CPU the actor pass leaves idle: the worker imports torch and the metric
    stack while the actors generate, and Ray hands it the diversity tasks that follow.
    """
    return cached_lpips(kind, weights_dir, _device(num_gpus)).name


def diversity_of_group(product: str, defect: str, references: Any, lpips_kind: str, weights_dir: str | None,
                       num_gpus: float, *blocks: dict[str, np.ndarray],
                       embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Diversity and mask metrics of one (product, defect) group, from the pair blocks (a Ray task,
    or a call in the driver). ``embeddings``: (ids, LPIPS embeddings) of the group's images made in
    the pass (``EvalActor``'s ``lpips``); without them the images' embeddings are computed here."""
    keep = [(b, np.flatnonzero((np.asarray(b["product"]).astype(str) == product)
                               & (np.asarray(b["defect"]).astype(str) == defect))) for b in blocks]
    cols = ("mask", "id") if embeddings is not None else ("image", "mask", "id")
    batch = {c: np.concatenate([np.asarray(b[c])[i] for b, i in keep if len(i)]) for c in cols}
    if embeddings is None:
        batch["product"] = np.asarray([product] * len(batch["id"]))
        batch["defect"] = np.asarray([defect] * len(batch["id"]))
        out = DiversityFn(lpips_kind, weights_dir, references, num_gpus=num_gpus)(batch)
        return {k: (v[0].item() if isinstance(v[0], np.generic) else v[0]) for k, v in out.items()}
    import torch

    ids, emb = np.asarray(embeddings[0]).astype(str), np.asarray(embeddings[1])
    at = {i: n for n, i in enumerate(ids)}
    order = np.argsort(batch["id"].astype(str), kind="stable")  # id order, as DiversityFn's
    missing = sorted(set(batch["id"].astype(str)) - set(at))
    if missing or len(at) != len(ids):
        raise ValueError(f"LPIPS embeddings of {product}/{defect} do not match its pairs "
                         f"(missing ids {missing[:5]}, {len(ids) - len(at)} repeated)")
    feats = torch.from_numpy(np.ascontiguousarray(emb[[at[i] for i in batch["id"].astype(str)[order]]]))
    model = cached_lpips(lpips_kind, weights_dir, _device(num_gpus))
    row = diversity_row(product, defect, model, feats.to(model.device), list(batch["mask"][order]),
                        _get(references).get(f"{product}/{defect}", {}))
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


class DiversityFn:
    """One (product, defect) group of generated pairs -> one row of diversity and mask metrics.

    Mean pairwise LPIPS among the group's images; IC-LPIPS with the real few-shot *training*
    images of that (product, defect) as cluster centres; mask quality against the real masks of
    that (product, defect). ``references`` maps ``"product/defect"`` to ``{"centres": images,
    "masks": masks}`` (an ObjectRef is resolved once per actor).
    """

    def __init__(self, lpips_kind: str, weights_dir: str | None, references: Any, max_pairs: int | None = 2000,
                 num_gpus: float = 0.0) -> None:
        self.lpips = cached_lpips(lpips_kind, weights_dir, _device(num_gpus))
        self.references = _get(references)
        self.max_pairs = max_pairs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        product, defect = str(batch["product"][0]), str(batch["defect"][0])
        order = np.argsort(np.asarray(batch["id"]).astype(str), kind="stable")  # independent of shuffle order
        images, masks = np.asarray(batch["image"])[order], np.asarray(batch["mask"])[order]
        row = diversity_row(product, defect, self.lpips, self.lpips.features(images), list(masks),
                            self.references.get(f"{product}/{defect}", {}), self.max_pairs)
        return {k: np.asarray([v]) for k, v in row.items()}


def diversity_row(product: str, defect: str, lpips_model: Any, feats: Any, masks: list[np.ndarray],
                  ref: dict[str, Any], max_pairs: int | None = 2000) -> dict[str, Any]:
    """The diversity / mask-quality row of one (product, defect) group, from its images' LPIPS
    features (``LpipsDistance.features``, images in id order) and masks; ``ref``: the group's
    ``{"centres", "masks"}`` (``DiversityFn``). One function for every path (a Ray task per group,
    the driver from the pair blocks, the driver from embeddings made in the pass), so all give the
    same row."""
    from defectforge.evaluate.metrics import diversity_from_features, mask_quality, metric_name

    row: dict[str, Any] = {"product": product, "defect": defect, "n": float(len(masks))}
    lp, ic = metric_name("lpips", lpips_model), metric_name("ic_lpips", lpips_model)
    centres = ref.get("centres")
    centre_feats = lpips_model.features(np.asarray(centres)) if centres is not None and len(centres) else None
    row[lp], row[ic] = diversity_from_features(lpips_model, feats, centre_feats, max_pairs=max_pairs)
    real_masks = ref.get("masks")
    if real_masks is not None and len(real_masks):
        row.update(mask_quality(list(masks), list(real_masks)))
    return row
