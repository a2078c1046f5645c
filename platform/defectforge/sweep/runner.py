"""Hyper-parameter sweeps: Ray Tune + Optuna over a search-space file, any registered method.

The Train V2 pattern (DESIGN.md): each trial is a *function trainable* that applies its
parameters to the base config, fits a ``TorchTrainer`` (named by trial id, so a restarted trial
resumes its Train run) with ``TuneReportCallback`` forwarding the training losses to Tune, then
runs the evaluation pipeline on the trained checkpoint and reports the objective(s).

* Search: ``OptunaSearch`` (TPE, seeded, ``points_to_evaluate`` = the space's paper defaults).
  Training reports carry losses, not the objective, so Optuna is told only about results that
  hold the objective (``ObjectiveOnlyOptunaSearch``) and strict metric checking is off for the
  sweep driver (``TUNE_DISABLE_STRICT_METRIC_CHECKING``, Tune's own switch for this).
* Scheduling: ``ASHAScheduler`` on the training ``loss`` (single-objective sweeps), so poor
  trials stop before their evaluation is paid for.
* Concurrency: ``max_concurrent_trials`` = what the cluster's CPUs (GPUs) hold given each trial's
  Train workers, unless ``sweep.max_concurrent`` says otherwise.
* Per-product sweeps run one study per product (Ray tasks, concurrent when resources allow);
  multi-product sweeps one study.
* Resume: ``Tuner.restore`` when the sweep's folder exists: finished trials are not re-run and the
  MLflow runs are found again by tag (``sweep/mlflow_runs.py``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from defectforge.cluster import outside_placement_group
from defectforge.config import ConfigBase, config_from_dict, deep_merge
from defectforge.sweep.objectives import Objective, objective_values
from defectforge.train import reuse

# What a Tune trial reserves for itself (a coordinator process; see run_study).
TRIAL_MEMORY_BYTES = 64 * 1024**2

os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


class ObjectiveOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that ignores intermediate results without the objective (training losses).

    Module-level (not a closure) so that Tune can pickle it into the sweep checkpoint.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)


@dataclass
class StudySpec:
    """Everything a study (one per product in per-product mode) needs; sent to a Ray task."""

    name: str
    products: list[str]
    cfg: dict[str, Any]
    space_source: str
    storage: str
    uri: str
    experiment: str
    parent_run_id: str
    objectives: list[Objective]


def trial_resources(cfg: ConfigBase) -> dict[str, float]:
    """What one trial occupies at its peak: its Train workers while training, then the evaluation
    pipeline's map tasks (``evaluation.num_actors`` CPUs; GPUs on a GPU evaluation).

    Why no spare CPU for the evaluation: a trial evaluates its own checkpoint, so the pipeline's
    input blocks are already in the object store (``pipeline.generated_from_checkpoint``, reserve
    0); only a folder of pairs has decoding tasks upstream that need one. The CPU a second trial
    holds leaves the first's ``split_block`` / segmentation tasks waiting their turn, never stuck:
    they are short tasks behind short map tasks. Counting one CPU more made every laptop-preset
    sweep run one trial at a time on 2 CPUs (issue 12: one core idle through every training;
    DefectSynth's 4-trial sweep took 17.7 min)."""
    sc = cfg.train.scaling
    n = max(sc.num_workers, 1)
    train_cpu = float(sc.resources_per_worker.get("CPU", 1)) * n
    eval_cpu = float(cfg.evaluation.num_actors)
    gpu = float(sc.resources_per_worker.get("GPU", 1)) * n if sc.use_gpu else 0.0
    gpu = max(gpu, cfg.evaluation.num_actors * cfg.evaluation.num_gpus_per_actor)
    return {"CPU": max(train_cpu, eval_cpu), "GPU": gpu}


def gpu_hours(cfg: ConfigBase, train_s: float, eval_s: float) -> float:
    """GPU-hours a trial held: its Train workers' GPUs while it trained here (0 s when it reused a
    generator) plus the evaluation actors' GPUs while it evaluated. Logged per trial (MLflow
    metric ``gpu_hours``) so a cluster sweep's cost is read off the runs; 0 on CPU."""
    sc = cfg.train.scaling
    train_gpus = float(sc.resources_per_worker.get("GPU", 1)) * max(sc.num_workers, 1) if sc.use_gpu else 0.0
    eval_gpus = cfg.evaluation.num_actors * cfg.evaluation.num_gpus_per_actor
    return (train_gpus * train_s + eval_gpus * eval_s) / 3600.0


# A custom resource only the trial-driver nodes of cluster.yaml declare: trial coordinators ask for
# one, so they land on those cheap CPU nodes (never on a GPU node, never on the head) and the
# autoscaler adds driver nodes as trials queue. Asked when env DEFECTFORGE_TRIAL_RESOURCE names it
# (cluster.yaml exports it: right after `ray up` the driver node may still be booting, and a
# resource missing from the live cluster must still be asked for, so the autoscaler starts it),
# or when the live cluster declares it. Neither (a laptop): not asked.
DRIVER_RESOURCE = "trial_driver"
DRIVER_RESOURCE_ENV = "DEFECTFORGE_TRIAL_RESOURCE"


def trial_driver_resources() -> dict[str, float]:
    import os

    import ray

    name = os.environ.get(DRIVER_RESOURCE_ENV)
    if name:
        return {name: 1.0}
    return {DRIVER_RESOURCE: 1.0} if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0 else {}


def max_concurrent_trials(cfg: ConfigBase) -> int:
    """``sweep.max_concurrent``, else as many trials as the cluster holds at their peak needs
    (concurrent Ray Data pipelines that each hold every CPU would otherwise starve each other)."""
    import ray

    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    total = ray.cluster_resources()
    need = trial_resources(cfg)
    fits = [math.floor(total.get(k, 0) / v) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)


def _pretrained_once(cfg: Any, spec: StudySpec, data: Any, trial_id: str, run_id: str,
                     pre: dict[str, Any]) -> Any:
    """Train the method's pretraining stage once per study (``MethodConfigBase.pretraining``) and
    return the trial's config training the other stages from it.

    The pretraining run is keyed by the data, ``train`` (with the stage's own steps, rate and
    decay in place of ``train``'s where the method sets them) and only the method fields it
    depends on (``reuse.training_key(..., method_fields)``), so trials that differ in anything
    else share it; the same registry + done marker as every train-once run make concurrent trials wait for
    one another and a restored sweep find it done. It logs to one MLflow run of its own
    (``defectforge.kind`` = pretraining); each trial's run names it (tag ``defectforge.pretraining``)."""
    import torch

    from defectforge.methods import registry
    from defectforge.sweep import mlflow_runs
    from defectforge.train.runner import fit_generator

    stage = pre["stage"]
    with torch.device("meta"):  # only its stages are needed: no weights (as train.runner.check_buildable)
        gen = registry.get(cfg.method.name)(cfg.method, data.context)
    [spec_stage] = [s for s in gen.stages() if s.name == stage]
    # The stage's own steps / rate / decay replace train.*'s in the pretraining config: a trial's
    # swept train.lr (the method's own stages' rate) must not key, and so repeat, a pretraining it
    # does not change (measured: a DefectSynth sweep over train.lr pretrained once per trial).
    own = {k: v for k, v in (("steps", spec_stage.steps), ("lr", spec_stage.lr),
                             ("weight_decay", spec_stage.weight_decay)) if v is not None}
    pre_cfg = config_from_dict(deep_merge(cfg.to_dict(), {"train": {"stages": [stage], "init_from": None, **own}}))
    key = reuse.training_key(pre_cfg, method_fields=list(pre["fields"]))
    name = f"{spec.name}-pre-{stage}-{key[:12]}"

    def train() -> dict[str, Any]:
        pre_run = mlflow_runs.pretraining_run(spec.uri, spec.experiment, spec.name, spec.parent_run_id, name,
                                              {"stage": stage, "trained_by_trial": trial_id})
        result = fit_generator(pre_cfg.to_dict(), data.context.to_json(), data.rows, name,
                               str(Path(spec.storage) / "train"), {"uri": spec.uri, "run_id": pre_run})
        mlflow_runs.finish(spec.uri, pre_run, error=result["error"])
        if result["error"]:
            raise RuntimeError(f"pretraining ({stage}) failed: {result['error']}")
        return {"checkpoint": str(result["checkpoint"]), "loss": result["metrics"].get("loss", float("nan")),
                "trained_by": trial_id, "mlflow_run": pre_run}

    record, _ = reuse.train_once(reuse.registry_handle(spec.name), key, trial_id,
                                 Path(spec.storage) / "train-once" / name, train,
                                 log=lambda msg: print(f"[sweep] {msg}", flush=True))
    import mlflow

    mlflow.MlflowClient(spec.uri).set_tag(run_id, "defectforge.pretraining", name)
    rest = [s.name for s in gen.stages() if s.name != stage]
    return config_from_dict(deep_merge(cfg.to_dict(), {"train": {
        "stages": rest, "init_from": str(Path(record["checkpoint"]) / "generator"),
        "init_modules": list(pre["modules"])}}))


def _trial(config: dict[str, Any], spec: StudySpec) -> None:
    """One Tune trial: train (Ray Train, reports forwarded), evaluate, report the objective(s)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from defectforge.evaluate.run import evaluate
    from defectforge.sweep import mlflow_runs
    from defectforge.sweep.space import load_space
    from defectforge.train.data import load_training_data
    from defectforge.train.runner import fit_generator

    space = load_space(spec.space_source, preset=spec.cfg["preset"])
    params = {k: v for k, v in config.items() if k in space.parameters}
    cfg = space.apply(config_from_dict(spec.cfg), params)
    trial_id = tune.get_context().get_trial_id()
    # A trial trains its own study's products, or nothing: Tune's record of the study this trial
    # belongs to (its experiment) must be the spec's study, and the spec's config its products.
    study = tune.get_context().get_experiment_name()
    if study != spec.name or sorted(cfg.data.products or []) != sorted(spec.products):
        raise RuntimeError(f"trial {trial_id} of study {study!r} was handed study {spec.name!r}'s spec "
                           f"(products {spec.products}, data.products {cfg.data.products}); refusing to train "
                           "another study's product")
    done = mlflow_runs.finished_trial(spec.uri, spec.experiment, spec.name, trial_id)
    if done is not None:
        # This trial finished (its MLflow run holds the result) but the driver died before Tune
        # recorded it, so the restored sweep starts it again: report the recorded result instead
        # of training and evaluating a second time.
        objectives, result = done
        print(f"[sweep] {spec.name}: trial {trial_id} had already finished (MLflow run {result['mlflow_run_id']}); "
              "reporting its recorded result", flush=True)
        tune.report({**objectives, **result})
        return
    run_id = mlflow_runs.child_run(spec.uri, spec.experiment, spec.name, spec.parent_run_id, trial_id,
                                   {**params, "products": ",".join(spec.products)})
    timing: dict[str, float] = {"train_s": 0.0}  # this trial's own training time (0 when it reuses one)
    try:
        data = load_training_data(cfg, spec.products)
        if sorted(data.context.products) != sorted(spec.products):
            raise RuntimeError(f"trial {trial_id} of study {spec.name!r} loaded products "
                               f"{list(data.context.products)}, not its study's {spec.products}")
        pre = cfg.method.pretraining() if cfg.train.init_from is None else None
        if pre is not None:  # e.g. the shared backbone: trained once per study, every trial starts from it
            cfg = _pretrained_once(cfg, spec, data, trial_id, run_id, pre)
        # Train once, sweep many: trials whose training-relevant config is equal share one Train
        # run (named by its hash); only sampling-time fields differ between them (train/reuse.py).
        train_name = reuse.run_name(spec.name, cfg)

        def train() -> dict[str, Any]:
            t_train = time.perf_counter()
            result = fit_generator(cfg.to_dict(), data.context.to_json(), data.rows, train_name,
                                   str(Path(spec.storage) / "train"), {"uri": spec.uri, "run_id": run_id},
                                   callbacks=[TuneReportCallback()])
            if result["error"]:
                raise RuntimeError(f"training failed: {result['error']}")
            timing["train_s"] = time.perf_counter() - t_train
            return {"checkpoint": str(result["checkpoint"]), "loss": result["metrics"].get("loss", float("nan")),
                    "trained_by": trial_id, "trained_by_run": run_id}

        record, trained_here = reuse.train_once(
            reuse.registry_handle(spec.name), reuse.training_key(cfg), trial_id,
            Path(spec.storage) / "train-once" / train_name, train,
            log=lambda msg: print(f"[sweep] {msg}", flush=True))
        import mlflow
        from mlflow.entities import RunTag

        mlflow.MlflowClient(spec.uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in {
            "defectforge.train_run": train_name, "defectforge.train_key": reuse.training_key(cfg),
            "defectforge.trained_here": str(trained_here).lower(),
            "defectforge.trained_by_run": record.get("trained_by_run", "")}.items()])
        result = {"metrics": {"loss": record.get("loss", float("nan"))}}
        # This trial's own checkpoint: the (possibly shared) trained weights with this trial's
        # sampling options (u, sampler, steps) recorded, so generate / the registered model sample
        # the trial as it is evaluated here.
        from defectforge.methods.base import SamplingOptions, checkpoint_with_sampling

        sampling = SamplingOptions.from_config(cfg)
        checkpoint = checkpoint_with_sampling(Path(record["checkpoint"]) / "generator",
                                              Path(spec.storage) / "trials" / f"{spec.name}-{trial_id}" / "generator",
                                              sampling)
        # The evaluation drives Ray Data and Ray tasks that need whole CPUs; run it as a task outside
        # the trial's tiny placement group, which would otherwise capture (and starve) all of them.
        import ray

        remote_eval = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=outside_placement_group())(evaluate)
        t_eval = time.perf_counter()
        summary = ray.get(remote_eval.remote(cfg, checkpoint=checkpoint, log_to_mlflow=False, quiet=True,
                                             sampling=sampling,
                                             out=Path(spec.storage) / "eval" / f"{spec.name}-{trial_id}"))
        timing["eval_s"] = time.perf_counter() - t_eval
        timing["gpu_hours"] = gpu_hours(cfg, timing["train_s"], timing["eval_s"])
        objectives = objective_values(summary)
        missing = [o.metric for o in spec.objectives if o.metric not in objectives]
        if missing:
            raise KeyError(f"sweep.objective {missing} not in the evaluation summary; "
                           f"available: {sorted(objectives)}")
        from defectforge.evaluate.report import log_summary_to_run

        log_summary_to_run(spec.uri, run_id, summary)
        import mlflow

        client = mlflow.MlflowClient(spec.uri)
        client.log_artifacts(run_id, str(checkpoint), "generator")
        for key, value in timing.items():  # train_s, eval_s and gpu_hours (the trial's cost on a cluster)
            client.log_metric(run_id, key, float(value))
        import ray

        # Which node coordinated the trial (on a cluster: one of the trial-driver nodes).
        node_id = ray.get_runtime_context().get_node_id()
        client.set_tag(run_id, "defectforge.node_id", node_id)
        recorded = {"loss": result["metrics"].get("loss", float("nan")), "checkpoint_dir": str(checkpoint),
                    "mlflow_run_id": run_id, "node_id": node_id, **timing}
        mlflow_runs.finish(spec.uri, run_id, trial_result=recorded)
    except Exception as exc:
        try:  # what the failed trial used so far still costs (train_s, gpu_hours)
            import mlflow

            spent = {k: float(v) for k, v in timing.items()}
            spent["gpu_hours"] = gpu_hours(cfg, spent["train_s"], spent.get("eval_s", 0.0))
            for key, value in spent.items():
                mlflow.MlflowClient(spec.uri).log_metric(run_id, key, value)
        except Exception:  # noqa: BLE001 (the trial's own error is what matters here)
            pass
        # if_running: a run Tune's callback already closed (ASHA stopped this trial, which is why
        # it is failing now) keeps its KILLED and reason.
        mlflow_runs.finish(spec.uri, run_id, error=f"{type(exc).__name__}: {exc}", if_running=True)
        raise
    tune.report({**objectives, **recorded})


def run_study(spec: StudySpec) -> dict[str, Any]:
    """Fit (or restore and finish) one Tune study.

    Returns ``{"trials": one row per trial Tune knows, "lost": trial ids whose MLflow run was
    opened by a trial that Tune's restored state never had}``. A driver killed after a trial
    started but before Tune's next save of its state (at most every 10 s) loses that trial: Tune
    runs another in its place; the lost trial's run is closed KILLED with the reason, and named
    here so that the summary says so rather than leaving a run in MLflow that no summary lists.
    (Its training is not lost: the train-once registry hands it to the trial that asks next.)"""
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from defectforge.sweep.space import define_by_run, load_space

    cfg = config_from_dict(spec.cfg)
    space = load_space(spec.space_source, preset=cfg.preset)
    objectives = spec.objectives
    metric = objectives[0].metric if len(objectives) == 1 else [o.metric for o in objectives]
    mode = objectives[0].mode if len(objectives) == 1 else [o.mode for o in objectives]
    searcher = ObjectiveOnlyOptunaSearch(
        space=define_by_run(space), metric=metric, mode=mode,
        points_to_evaluate=space.points_to_evaluate or None, sampler=TPESampler(seed=cfg.sweep.seed))
    n_reports = cfg.train.steps // cfg.train.checkpoint_every + (cfg.train.steps % cfg.train.checkpoint_every > 0)
    scheduler = None
    if cfg.sweep.scheduler == "asha" and len(objectives) == 1:
        scheduler = ASHAScheduler(time_attr="training_iteration", metric="loss", mode="min",
                                  max_t=n_reports + 1, grace_period=max(1, cfg.sweep.grace_period),
                                  reduction_factor=cfg.sweep.reduction_factor)
    # The trial itself only coordinates (its Train run and evaluation schedule their own CPUs outside
    # its placement group), so it reserves a little memory and no CPU: with even 0.01 CPU per trial,
    # two trials' 1-CPU Train workers no longer fit a 2-CPU machine (2.02 > 2) and the second
    # training waited for the first (measured on the laptop main job).
    trainable = tune.with_resources(study_trainable(spec), {"cpu": 0, "memory": TRIAL_MEMORY_BYTES,
                                                            **trial_driver_resources()})
    path = str(Path(spec.storage) / spec.name)
    from defectforge.sweep import mlflow_runs

    stopped_by = "ASHA" if scheduler is not None else "Tune (the sweep was stopped)"
    close_runs = mlflow_runs.CloseTrialRuns(spec.uri, spec.experiment, spec.name, stopped_by)
    if tune.Tuner.can_restore(path):
        print(f"[sweep] {spec.name}: restoring the interrupted sweep from {path}", flush=True)
        try:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
        except ValueError as exc:
            if "Invalid `trainable`" not in str(exc):
                raise
            raise ValueError(f"{path} was started by an older defectforge whose studies shared one trainable "
                             "(their trials could train another study's product): it cannot be restored; start "
                             f"the sweep again under another sweep.name or after removing {path}") from exc
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.sweep.num_trials,
                                        max_concurrent_trials=max_concurrent_trials(cfg)),
            run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage,
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_max_failures),
                                      callbacks=[close_runs], verbose=1),
        )
    reuse.registry_handle(spec.name)  # created here, so no trial owns it
    try:
        grid = tuner.fit()
    finally:
        reuse.drop_registry(spec.name)
    rows = []
    # No child run outlives its trial: close what the callback could not (a restored sweep, a
    # callback-less sweep state, a trial lost with a killed driver), as the ResultGrid says.
    outcomes: dict[str, tuple[str, str]] = {}
    for res in grid:
        metrics = res.metrics or {}
        row = {"trial_id": metrics.get("trial_id"), "products": spec.products,
               "study": spec.name, "error": _short_error(res.error)}
        params = {k: v for k, v in (res.config or {}).items() if k in space.parameters}
        row.update(params)
        row["params"] = params
        for k, v in metrics.items():
            if k in ("checkpoint_dir", "mlflow_run_id", "loss", "train_s", "eval_s", "gpu_hours", "node_id") \
                    or any(k == o.metric for o in objectives):
                row[k] = v
        row["status"] = "error" if res.error else ("done" if all(o.metric in row for o in objectives) else "stopped")
        rows.append(row)
        if not row["trial_id"]:
            continue
        if row["status"] == "done":
            outcomes[row["trial_id"]] = ("FINISHED", "finished")
        elif row["status"] == "error":
            outcomes[row["trial_id"]] = ("FAILED", f"trial errored: {row['error']}")
        else:  # the reason is worded from the trial's last metrics only for a stopped trial
            outcomes[row["trial_id"]] = ("KILLED", mlflow_runs.stop_reason(stopped_by, metrics))
    changed = mlflow_runs.close_study_runs(spec.uri, spec.experiment, spec.name, outcomes)
    for t in sorted(t for t in changed if t not in outcomes):
        print(f"[sweep] {spec.name}: trial {t} was lost with the interrupted sweep driver (Tune had not saved "
              "it yet); its MLflow run is now KILLED and another trial ran in its place", flush=True)
    # From the runs, not from what this driver closed: a study restored after the driver that
    # closed them (a later kill) still names its lost trials.
    return {"trials": rows, "lost": mlflow_runs.lost_trials(spec.uri, spec.experiment, spec.name)}


def study_trainable(spec: StudySpec) -> Any:
    """``_trial`` with this study's spec, under a name of its own: ``defectforge-trial-<study>``.

    Why the name matters: Tune registers a trainable in a job-wide registry (GCS key-value store,
    keyed by job id and the trainable's name) and builds every trial's actor from what is
    registered under that name *when the actor starts*. Per-product studies are concurrent Ray
    tasks of one job; under a shared name (``_trial``) the last study to register overwrote the
    other's spec, and that study's later trials trained the other product (issue 19).
    """
    from ray import tune

    fn = tune.with_parameters(_trial, spec=spec)
    fn.__name__ = f"defectforge-trial-{spec.name}"  # what Tune registers it as (Experiment.get_trainable_name)
    return fn


def _short_error(err: Any) -> str | None:
    if err is None:
        return None
    text = str(err).strip().splitlines()
    for line in reversed(text):
        if line.strip():
            return line.strip()[:500]
    return type(err).__name__
