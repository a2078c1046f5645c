"""Per-product and multi-product generator training on Ray Train (any registered method).

* **per-product**: one generator per product, each its own Ray Train run; the runs are launched
  as Ray tasks so they train concurrently when the cluster has the resources, and queue when not.
* **multi-product**: one generator over all selected products, conditioned on product and defect
  type by learned embeddings (the method's business; here it just gets a multi-product context).

Run names are deterministic (``<method>-<products>`` unless given), so starting the same command
again with the same ``--out`` resumes each run from its latest checkpoint (Train V2 restores a run
from its storage folder by name). The final inference checkpoint is copied to
``<out>/<name>/generator`` together with the split manifest and the resolved config.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectforge.cluster import ensure_ray
from defectforge.config import ConfigBase, save_config
from defectforge.methods.base import GeneratorContext
from defectforge.train.data import TrainingData, load_training_data
from defectforge.train.loop import GENERATOR_DIR, train_loop_per_worker


@dataclass
class TrainOutcome:
    """What one training run produced (or why it failed)."""

    name: str
    products: list[str]
    run_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    mlflow_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.checkpoint is not None


def scaling_config(cfg: ConfigBase):
    from ray.train import ScalingConfig

    sc = cfg.train.scaling
    return ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                         resources_per_worker=dict(sc.resources_per_worker) if sc.num_workers else None)


def fit_generator(cfg_dict: dict[str, Any], context_json: dict[str, Any], rows: list[dict[str, Any]],
                  name: str, storage_path: str, mlflow_info: dict[str, str] | None = None,
                  callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Build and fit one TorchTrainer; returns the latest checkpoint path, metrics or the error.

    Used directly, from a Ray task (per-product runs) and from a Tune trial (sweeps).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from defectforge.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg_dict, "context": context_json, "rows": rows,
                           "mlflow": mlflow_info, "label": name,
                           # Ray's local mode (no workers) persists nothing: the loop keeps checkpoints.
                           "local_checkpoint_root": str(Path(storage_path) / name) if cfg.train.scaling.num_workers == 0
                           else None},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            callbacks=callbacks,
        ),
    )
    try:
        with _print_patch_off(), _sigint_handler_restored():
            result = trainer.fit()
    except Exception as exc:  # TrainingFailedError wraps the worker's exception
        return {"error": _root_cause(exc), "checkpoint": None, "metrics": {}}
    ckpt = result.checkpoint
    return {"error": None, "checkpoint": ckpt.path if ckpt else None, "metrics": dict(result.metrics or {})}


PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


@contextlib.contextmanager
def _print_patch_off() -> Iterator[None]:
    """Ray Train's print patch off for one ``fit``, unless the user set it.

    Ray Train V2 replaces ``print`` in its controller and workers by a root-logger call that also
    prints when stdout is wrapped, as it is in a Tune trial's processes: every line the training
    loop printed reached a sweep's console twice (measured: a 1-trial tiny sweep printed its
    step-20 line twice, once with this off). Train reads the setting from the environment of the
    process that calls ``fit`` (a sweep trial, a per-product task, the CLI) when it creates the
    controller, and passes it on to the workers, so this covers a local cluster and a remote one
    alike; the process's environment is as it was after ``fit`` (a notebook's own later runs)."""
    if PRINT_PATCH_ENV in os.environ:
        yield
        return
    os.environ[PRINT_PATCH_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(PRINT_PATCH_ENV, None)


@contextlib.contextmanager
def _sigint_handler_restored() -> Iterator[None]:
    """Put back the SIGINT handler that ``fit`` replaces.

    Ray Train V2's ``fit`` (in a process's main thread: the CLI's single run, a per-product Ray
    task) installs a Ctrl-C handler that aborts its run, a closure over the run's controller
    actor handle, and never removes it. The handle kept the finished controller actor alive for
    as long as the handler stayed, about 700 MB in each long-lived process (a reused Ray worker, a
    notebook), and a later Ctrl-C tried to abort a run long over. During ``fit`` the handler is
    Ray's; after it, the process's own again."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Train registers no handler off the main thread (Tune trials)
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _root_cause(exc: BaseException) -> str:
    """The innermost message of a (Ray-wrapped) exception chain: what actually went wrong."""
    seen = exc
    while True:
        nxt = seen.__cause__ or getattr(seen, "cause", None)
        if not isinstance(nxt, BaseException) or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"


def check_buildable(cfg: ConfigBase, context: GeneratorContext) -> list[tuple[str, int]]:
    """Build the generator on the meta device (no memory, no weights: well under a second) and
    select its stages: a config the method cannot build (e.g. a resolution its receptive field
    does not divide) or a bad ``train.stages`` / ``train.init_from`` fails here, before Ray,
    Train or MLflow start, naming the field. Returns the stages that will train, with their steps."""
    import torch
    from pydantic import ValidationError

    from defectforge.errors import ConfigError
    from defectforge.methods.base import build_generator, select_stages

    try:
        with torch.device("meta"):
            probe = build_generator(cfg.method, context)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ConfigError(f"method {cfg.method.name} cannot be built with this config: {exc}") from None
    stages = select_stages(probe, cfg.train.stages, cfg.train.init_from, cfg.train.init_modules)
    return [(s.name, s.steps or cfg.train.steps) for s in stages]


def default_name(cfg: ConfigBase, products: list[str]) -> str:
    from defectforge.tracking import run_name

    return run_name("train", cfg.method.name, products)


def _mlflow_run(cfg: ConfigBase, name: str, data: TrainingData, run_dir: Path,
                fresh: bool = False) -> dict[str, str] | None:
    """Open (or, for a resumed run, reopen) the MLflow run of a training run.

    ``fresh``: the run folder was (re)created, so an MLflow run left by an earlier run in the same
    folder is detached (its folder tag renamed) rather than reopened with the old params.
    """
    import mlflow

    from defectforge import tracking

    uri = tracking.setup(cfg.tracking.uri, cfg.tracking.run_root,
                         tracking.experiment_name(cfg.method.name, cfg.tracking.experiment), cfg.tracking.timeout_s)
    if fresh:
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(tracking.experiment_name(cfg.method.name, cfg.tracking.experiment))
        for old in client.search_runs([exp.experiment_id], f"tags.`defectforge.train_dir` = '{run_dir}'"):
            client.set_tag(old.info.run_id, "defectforge.train_dir", f"{run_dir} (replaced)")
    run_id, created = tracking.reopen_or_create_run(
        uri, tracking.experiment_name(cfg.method.name, cfg.tracking.experiment),
        f"tags.`defectforge.train_dir` = '{run_dir}'", name,
        {"defectforge.kind": "train", "defectforge.method": cfg.method.name,
         "defectforge.products": ",".join(data.context.products), "defectforge.train_dir": str(run_dir)},
        tracking.flatten(cfg.to_dict()))
    if created:
        client = mlflow.MlflowClient(uri)
        client.log_dict(run_id, data.manifest, "split_manifest.json")
        client.log_dict(run_id, data.context.to_json(), "context.json")
    return {"uri": uri, "run_id": run_id}


def _finish(outcome: TrainOutcome, result: dict[str, Any], mlflow_info: dict[str, str] | None) -> TrainOutcome:
    outcome.error, outcome.metrics = result["error"], result["metrics"]
    if result["checkpoint"]:
        src = Path(result["checkpoint"]) / GENERATOR_DIR
        dst = outcome.run_dir / GENERATOR_DIR
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        outcome.checkpoint = dst
    if mlflow_info:
        import mlflow

        client = mlflow.MlflowClient(mlflow_info["uri"])
        if outcome.checkpoint:
            client.log_artifacts(mlflow_info["run_id"], str(outcome.checkpoint), "generator")
        if outcome.error:
            client.set_tag(mlflow_info["run_id"], "defectforge.error", outcome.error[:4000])
        client.set_terminated(mlflow_info["run_id"], "FAILED" if outcome.error else "FINISHED")
    return outcome


def _training_record(cfg: ConfigBase) -> dict[str, Any]:
    """The config fields that shape trained weights (the sweeps' rule, ``reuse.training_fields``:
    data, method minus sampling-time fields, train minus bookkeeping), flattened to dotted keys."""
    from defectforge.train.reuse import training_fields

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            flat[prefix] = node

    walk(training_fields(cfg), "")
    if flat.get("data.path"):
        flat["data.path"] = str(Path(flat["data.path"]).expanduser().resolve())
    return flat


def verify_resume(run_dir: Path, cfg: ConfigBase, manifest: dict[str, Any]) -> None:
    """A resumed run must train what it trained before: same data, split and training config.

    Why: resuming with other data or settings would keep the old weights ("already trained") while
    the run folder's config.yaml and split manifest claimed the new ones; a changed architecture
    would end in a raw size-mismatch traceback. Raises ``OutputError`` naming every difference.
    """
    import yaml

    from defectforge.config import config_from_dict
    from defectforge.errors import DefectforgeError, OutputError

    cfg_file, manifest_file = run_dir / "config.yaml", run_dir / "split_manifest.json"
    try:
        old_cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()))
        old_manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError, yaml.YAMLError, DefectforgeError) as exc:
        raise OutputError(f"{run_dir}: cannot read the run's record ({exc}); pass --overwrite to retrain "
                          "from scratch or choose another --name") from None
    old, new = _training_record(old_cfg), _training_record(cfg)
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if old_manifest != json.loads(json.dumps(manifest)):
        for side in ("train", "test"):
            if old_manifest.get(side) != manifest.get(side):
                diffs.append(f"split manifest: the {side} side differs ({old_manifest.get('n_' + side)} -> "
                             f"{manifest.get('n_' + side)} images)")
        if not any(d.startswith("split manifest") for d in diffs):
            diffs.append("split manifest differs")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} differences)" if len(diffs) > 6 else "")
        raise OutputError(f"{run_dir} was trained with other data, split or settings ({cfg_file.name}, "
                          f"{manifest_file.name}): {shown}. Pass --overwrite to retrain from scratch, or "
                          "use another --name / --out")


def train(cfg: ConfigBase, out: str | os.PathLike[str], name: str | None = None,
          log_to_mlflow: bool = True, overwrite: bool = False) -> list[TrainOutcome]:
    """Train ``cfg.method`` per product or across products; returns one outcome per run.

    Output policy (``defectforge.paths``): ``out`` is a run root (new, empty, or one defectforge
    made); each run folder ``<out>/<name>`` is created, or resumed only when its recorded data,
    split and training config match (``verify_resume``), or replaced whole with ``overwrite``.
    """
    import ray

    from defectforge.cluster import check_gpus_available
    from defectforge.errors import ConfigError
    from defectforge.paths import claim_output, safe_component

    if name is not None:
        safe_component(name, "run name", error=ConfigError)
    out_dir, _ = claim_output(out, "run-root", resumable=True, flag="--out", legacy=("mlflow.db", "ray"))
    out_dir = out_dir.resolve()
    from defectforge.cluster import STORAGE_ENV, check_shared_storage, check_storage_path, storage_for

    asked = os.environ.get(STORAGE_ENV)  # a cluster's storage root: one folder per --out under it
    if asked:
        check_storage_path(asked, f"env {STORAGE_ENV}")
    storage = storage_for(asked, out_dir, "train") if asked else str(out_dir / "ray")
    storage_flag = f"env {STORAGE_ENV}" if asked else "Ray Train storage (<--out>/ray)"
    check_gpus_available(cfg.train.scaling.use_gpu, "train.scaling.use_gpu")
    data = load_training_data(cfg)
    stages = check_buildable(cfg, data.context)
    steps = " + ".join(f"{name} {n}" for name, n in stages) + " steps" if stages else "no training stages"
    products = list(data.context.products)
    groups = [[p] for p in products] if cfg.train.mode == "per-product" else [products]

    # Every run folder is checked before any is written or Ray starts: all or nothing.
    planned = []
    for group in groups:
        sub = data.for_products(group)
        run_name = name if (name and len(groups) == 1) else (f"{name}-{group[0]}" if name else default_name(cfg, group))
        safe_component(run_name, "run name", error=ConfigError)
        run_dir = out_dir / run_name
        _, resumed = claim_output(run_dir, "train-run", overwrite=overwrite, resumable=True, flag="run folder",
                                  legacy=("config.yaml",), create=False)
        if resumed:
            verify_resume(run_dir, cfg, sub.manifest)
        planned.append((group, sub, run_name, run_dir, resumed))
    ensure_ray()
    check_shared_storage(storage, storage_flag)

    jobs = []
    for group, sub, run_name, run_dir, resumed in planned:
        if overwrite:
            shutil.rmtree(Path(storage) / run_name, ignore_errors=True)  # its checkpoints go too
        claim_output(run_dir, "train-run", overwrite=overwrite, resumable=True, flag="run folder",
                     legacy=("config.yaml",))
        if not resumed:
            save_config(cfg, run_dir / "config.yaml")
            (run_dir / "split_manifest.json").write_text(json.dumps(sub.manifest, indent=2))
        mlflow_info = _mlflow_run(cfg, run_name, sub, run_dir, fresh=not resumed) if log_to_mlflow else None
        n_def = sum(r["defect"] != "good" for r in sub.rows)
        print(f"[train] {run_name}: {cfg.method.name} on {group} - {len(sub.rows)} training images "
              f"({n_def} defective), {steps}, batch {cfg.train.batch_size}, "
              f"{cfg.train.scaling.num_workers or 'in-process'} worker(s)", flush=True)
        outcome = TrainOutcome(run_name, group, run_dir, None,
                               mlflow_run_id=mlflow_info["run_id"] if mlflow_info else None)
        args = (cfg.to_dict(), sub.context.to_json(), sub.rows, run_name, storage, mlflow_info)
        jobs.append((outcome, mlflow_info, args))

    if len(jobs) == 1:
        outcome, info, args = jobs[0]
        return [_finish(outcome, fit_generator(*args), info)]

    # Several products: one Ray task per run so the runs share the cluster (queued when it is full).
    sc = cfg.train.scaling
    driver_cpus = float(sc.resources_per_worker.get("CPU", 1)) if sc.num_workers == 0 else 0.01
    remote_fit = ray.remote(num_cpus=driver_cpus, max_retries=0)(fit_generator)
    refs = [remote_fit.remote(*args) for _, _, args in jobs]
    return [_finish(outcome, ray.get(ref), info) for (outcome, info, _), ref in zip(jobs, refs)]
