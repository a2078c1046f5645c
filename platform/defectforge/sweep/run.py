"""The sweep front door: parent MLflow run, one study per product (or one), results, registry.

``sweep(cfg)`` is what ``defectforge sweep`` and ``jobs/sweep_defectgen.py`` call. At the end the
parent run holds a results table (CSV + JSON), a trade-off / Pareto plot PNG and the summary; the
best trial's generator of each study is registered as ``defectforge-<method>[-<product>]`` with
the alias ``best``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from defectforge.config import ConfigBase, ConfigError, with_overrides
from defectforge.sweep.objectives import Objective, best_row, default_objective, pareto_front, parse_objectives
from defectforge.sweep.runner import StudySpec, run_study


def default_name(cfg: ConfigBase) -> str:
    return cfg.sweep.name or f"sweep-{cfg.method.name}"


def resume_record(cfg: ConfigBase, space_source: str | Path, objectives: list[Any],
                  products: list[str]) -> dict[str, Any]:
    """What a study's results depend on: the config (without tracking and sweep bookkeeping), the
    search space's content (its ``extends`` chain resolved: an edited base file is a changed space)
    and the objectives. A restored study must match it (``check_resume``)."""
    from defectforge.sweep.space import space_data

    d = cfg.to_dict()
    d.pop("tracking", None)
    for k in ("name", "max_concurrent", "storage_path", "register_model", "space", "num_trials"):
        d.get("sweep", {}).pop(k, None)
    d["data"]["products"] = list(products)
    return {"config": d, "space": space_data(space_source),
            "objectives": [dict(o.__dict__) for o in objectives]}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out or {prefix: {}}


def check_resume(storage: str, study: str, record: dict[str, Any]) -> None:
    """Refuse to restore ``study`` with other settings than it started with, naming the first field
    that differs: Tune would restore the old trials and run the new ones with the new settings, a
    silent mix of two sweeps in one table. On a first start the record is written beside Tune's
    folder (``<storage>/<study>.sweep.json``)."""
    path = Path(storage) / f"{study}.sweep.json"
    tune_dir = Path(storage) / study
    if path.is_file() and tune_dir.is_dir():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path}: the record of sweep {study!r} is not readable JSON; remove {tune_dir} "
                              f"and {path} to start the sweep again") from None
        a, b = _flat(old), _flat(json.loads(json.dumps(record, default=str)))
        diff = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
        if diff:
            k = diff[0]
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise ConfigError(f"sweep {study!r} in {tune_dir} was started with other settings: {k} was "
                              f"{a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}{more}; resuming would mix two "
                              "sweeps' trials. Use another sweep.name (--name), or remove "
                              f"{tune_dir} and {path} to start it again")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))


def model_name(method: str, products: list[str], per_product: bool) -> str:
    return f"defectforge-{method}" + (f"-{products[0]}" if per_product else "")


def sweep(cfg: ConfigBase, summary_json: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep described by ``cfg.sweep``; returns the summary dict."""

    from defectforge import tracking
    from defectforge.cluster import ensure_ray
    from defectforge.evaluate.run import settle_extractors
    from defectforge.sweep import mlflow_runs
    from defectforge.sweep.space import load_space, space_data
    from defectforge.train.data import load_training_data

    t0 = time.perf_counter()
    # The extractor in force (standard weights, else the stand-in, said in one line) decides the
    # metric names, hence the default objective; the trials get the settled config.
    cfg = settle_extractors(cfg)
    objectives = parse_objectives(cfg.sweep.objective or default_objective(cfg), cfg.sweep.mode)
    seg = [o.metric for o in objectives if o.metric.startswith("seg_")]
    if seg and not cfg.evaluation.segmentation:
        raise ConfigError(f"sweep.objective {seg} needs the downstream segmentation, but evaluation.segmentation "
                          "is false: set it to true or choose another objective (e.g. kid_randfeat:min)")
    space = load_space(cfg.sweep.space or cfg.method.name, preset=cfg.preset)
    if space.method != cfg.method.name:
        raise ConfigError(f"search space {space.source} is for method {space.method!r}, not {cfg.method.name!r}")
    name = default_name(cfg)
    run_root = Path(cfg.tracking.run_root).resolve()
    from defectforge.cluster import STORAGE_ENV, check_shared_storage, check_storage_path, storage_for

    if cfg.sweep.storage_path:  # as given: a resumed sweep names the same folder
        check_storage_path(cfg.sweep.storage_path, "sweep.storage_path")
        storage = str(Path(cfg.sweep.storage_path).expanduser().resolve())
    elif os.environ.get(STORAGE_ENV):  # a cluster's storage root: one folder per run root under it
        check_storage_path(os.environ[STORAGE_ENV], f"env {STORAGE_ENV}")
        storage = storage_for(os.environ[STORAGE_ENV], run_root, "sweeps")
    else:
        storage = str(run_root / "sweeps")
    # Output policy (defectforge.paths), before MLflow, data or Ray: the run root is new, empty or
    # defectforge's, and a local storage path is writable; a GPU request has a GPU to run on.
    from defectforge.cluster import check_gpus_available
    from defectforge.paths import check_output_parent, claim_output

    claim_output(run_root, "run-root", resumable=True, flag="tracking.run_root", legacy=("mlflow.db", "ray"))
    check_output_parent(storage, flag="sweep.storage_path")
    check_gpus_available(cfg.train.scaling.use_gpu, "train.scaling.use_gpu")
    data = load_training_data(cfg)  # validates the data (and writes the synthetic set) before any trial
    from defectforge.train.runner import check_buildable

    check_buildable(cfg, data.context)  # the base config; each search-space point is checked at load
    if cfg.data.path is None:
        cfg = with_overrides(cfg, {"data.path": str(data.root)})
    if cfg.train.scaling.num_workers == 0:
        # Ray Train's in-process mode is not available inside a Tune trial: one worker actor instead.
        print("[sweep] train.scaling.num_workers=0 -> 1: sweep trials train on a Ray Train worker", flush=True)
        cfg = with_overrides(cfg, {"train.scaling.num_workers": 1})
    products = list(data.context.products)
    per_product = cfg.train.mode == "per-product"
    groups = [[p] for p in products] if per_product else [products]
    for g in groups:  # a resumed study must be the same study (before Ray or any MLflow run)
        check_resume(storage, f"{name}-{g[0]}" if per_product else name,
                     resume_record(cfg, space.source, objectives, g))
    experiment = tracking.experiment_name(cfg.method.name, cfg.tracking.experiment)
    uri = tracking.setup(cfg.tracking.uri, run_root, experiment, cfg.tracking.timeout_s)  # fails fast
    ensure_ray()
    check_shared_storage(storage, "sweep.storage_path")  # a multi-node cluster needs shared storage
    from defectforge.cluster import removing_leaked_placement_groups

    # A killed earlier driver's trainings may still hold CPUs in placement groups nobody uses, or
    # take them seconds after this driver starts; a restored sweep on the same cluster would wait
    # for them for ever. So: at the start, every 15 s while the studies run, and at the end.
    with removing_leaked_placement_groups(lambda msg: print(msg, flush=True)):
        space_meta = {"source": str(space.source), "resolved": space_data(space.source),
                      "parameters": sorted(space.parameters),
                      "points_to_evaluate": space.points_to_evaluate,
                      "objectives": [o.__dict__ for o in objectives]}
        parent_id = mlflow_runs.parent_run(uri, experiment, name, cfg.to_dict(), space_meta)
        print(f"[sweep] {name}: {cfg.sweep.num_trials} trial(s) per study, {len(groups)} study(ies) over {products}, "
              f"objective {', '.join(f'{o.metric} ({o.mode})' for o in objectives)}; MLflow parent run {parent_id}",
              flush=True)
        specs = [StudySpec(name=f"{name}-{g[0]}" if per_product else name, products=g,
                           cfg=with_overrides(cfg, {"data.products": g}).to_dict(), space_source=str(space.source),
                           storage=storage, uri=uri, experiment=experiment, parent_run_id=parent_id,
                           objectives=objectives) for g in groups]
        if len(specs) == 1:
            results = [run_study(specs[0])]
        else:  # one Tune driver per product, as Ray tasks: concurrent when the cluster has room
            results = run_studies(specs, cfg)

        studies = []
        for spec, result in zip(specs, results):
            rows = result["trials"]
            study: dict[str, Any] = {"name": spec.name, "products": spec.products, "trials": rows,
                                     "lost": result["lost"]}
            if len(objectives) == 1:
                best = best_row([r for r in rows if r["status"] == "done"], objectives[0])
                study["best"] = best
                if best and cfg.sweep.register_model:
                    mname = model_name(cfg.method.name, spec.products, per_product)
                    version = mlflow_runs.register_best(uri, best["mlflow_run_id"], best["checkpoint_dir"], mname)
                    study["registered_model"] = {"name": mname, "version": version, "alias": "best",
                                                 "uri": f"models:/{mname}@best"}
            else:
                study["pareto_front"] = pareto_front([r for r in rows if r["status"] == "done"], objectives)
            studies.append(study)

        summary = {"sweep": name, "method": cfg.method.name, "objectives": [o.__dict__ for o in objectives],
                   "tracking_uri": uri, "experiment": experiment, "parent_run_id": parent_id, "storage": storage,
                   "studies": studies, "duration_s": time.perf_counter() - t0,
                   "ui_command": ui_command(uri, run_root)}
        _log_parent(uri, parent_id, summary, objectives, run_root / "sweeps" / f"{name}-report")
    if summary_json:
        Path(summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_studies(specs: list[StudySpec], cfg: ConfigBase) -> list[dict[str, Any]]:
    """Run the studies as Ray tasks (one Tune driver each), as many at once as the sweep may run
    trials at once (``sweep.max_concurrent``, else what the cluster holds at the trials' peak),
    each study getting its share of that concurrency. Returns each study's ``run_study`` result,
    in ``specs`` order.

    Why not every study at once: each study's Tune driver starts its own trials, which know
    nothing of the other studies' CPU needs; more studies than the sweep's concurrency would
    oversubscribe the cluster. (When evaluations still had decoding tasks upstream of an actor
    pool, two studies' evaluations on a cluster that held one starved each other's read tasks for
    ever: seen on 2 CPUs. On 2 CPUs today two studies run at once, one trial each:
    ``runner.trial_resources``.)
    """
    import dataclasses

    import ray

    from defectforge.sweep.runner import max_concurrent_trials

    total = max_concurrent_trials(cfg)
    at_once = min(len(specs), total)
    share = max(1, total // at_once)
    specs = [dataclasses.replace(s, cfg={**s.cfg, "sweep": {**s.cfg["sweep"], "max_concurrent": share}})
             for s in specs]
    if at_once < len(specs):
        print(f"[sweep] {at_once} study(ies) at a time: the sweep runs at most {total} trial(s) at once", flush=True)
    remote = ray.remote(num_cpus=0, max_retries=0)(run_study)
    queue, running, results = list(range(len(specs))), {}, {}
    while queue or running:
        while queue and len(running) < at_once:
            i = queue.pop(0)
            running[remote.remote(specs[i])] = i
        [ready], _ = ray.wait(list(running), num_returns=1)
        results[running.pop(ready)] = ray.get(ready)
    return [results[i] for i in range(len(specs))]


def ui_command(uri: str, run_root: Path) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri} in a browser"


def results_table(summary: dict[str, Any]) -> str:
    """A plain-text table of every trial: study, status, parameters, objectives; a trial lost with an
    interrupted driver (``run_study``) is listed with status ``lost``, as its KILLED MLflow run is."""
    objectives = [o["metric"] for o in summary["objectives"]]
    rows = listed_rows(summary)
    params = sorted({k for r in rows for k in r.get("params", {})})
    head = ["study", "trial", "status", *[p.split(".")[-1] for p in params], *objectives, "loss"]
    lines = [head]
    for r in rows:
        lines.append([r["study"], str(r.get("trial_id") or "?"), r["status"],
                      *[_fmt(r.get("params", {}).get(p)) for p in params],
                      *[_fmt(r.get(o)) for o in objectives], _fmt(r.get("loss"))])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def listed_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the table and the CSV list: every study's trials, then each study's lost trials
    (``run_study``) as rows of status ``lost``, so every child run in MLflow has a row."""
    rows = [r for s in summary["studies"] for r in s["trials"]]
    return rows + [{"study": s["name"], "trial_id": t, "status": "lost", "params": {}}
                   for s in summary["studies"] for t in s.get("lost", [])]


def _csv(summary: dict[str, Any]) -> str:
    rows = listed_rows(summary)
    keys = sorted({k for r in rows for k in r if k != "params"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in keys})
    return buf.getvalue()


def tradeoff_plot(summary: dict[str, Any], objectives: list[Objective], path: Path) -> Path | None:
    """Scatter of the trials over the first two objectives (or objective vs loss), Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for s in summary["studies"] for r in s["trials"] if r["status"] == "done"]
    x_obj = objectives[0]
    y_key = objectives[1].metric if len(objectives) > 1 else "loss"
    pts = [(r[x_obj.metric], r.get(y_key)) for r in rows
           if isinstance(r.get(x_obj.metric), (int, float)) and isinstance(r.get(y_key), (int, float))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], label="trials", color="tab:blue")
    if len(objectives) > 1:
        front = sorted(pareto_front(rows, objectives[:2]), key=lambda r: r[x_obj.metric])
        ax.plot([r[x_obj.metric] for r in front], [r[y_key] for r in front], "o-", color="tab:red",
                label="Pareto front")
    for r in rows:
        if isinstance(r.get(x_obj.metric), (int, float)) and isinstance(r.get(y_key), (int, float)):
            ax.annotate(str(r.get("trial_id", ""))[-5:], (r[x_obj.metric], r[y_key]), fontsize=7)
    ax.set_xlabel(f"{x_obj.metric} ({x_obj.mode})")
    ax.set_ylabel(y_key if len(objectives) == 1 else f"{y_key} ({objectives[1].mode})")
    ax.set_title(summary["sweep"])
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _log_parent(uri: str, parent_id: str, summary: dict[str, Any], objectives: list[Objective], out: Path) -> None:
    import mlflow

    from defectforge.sweep import mlflow_runs

    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    client.log_text(parent_id, results_table(summary), "results/table.txt")
    client.log_text(parent_id, _csv(summary), "results/trials.csv")
    client.log_text(parent_id, json.dumps(summary, indent=2, default=str), "results/summary.json")
    plot = tradeoff_plot(summary, objectives, out / ("pareto.png" if len(objectives) > 1 else "tradeoff.png"))
    if plot:
        client.log_artifact(parent_id, str(plot), "results")
    best_vals = {}
    for s in summary["studies"]:
        if s.get("best"):
            for o in objectives:
                best_vals[f"best_{o.metric}" + (f"_{s['products'][0]}" if len(summary["studies"]) > 1 else "")] = \
                    s["best"][o.metric]
    n_done = sum(r["status"] == "done" for s in summary["studies"] for r in s["trials"])
    mlflow_runs.log_metrics(uri, parent_id, {**best_vals, "trials_done": n_done})
    mlflow_runs.finish(uri, parent_id)
