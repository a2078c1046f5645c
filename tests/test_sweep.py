"""Sweeps end to end on the tiny preset: Tune + Optuna trials that train and evaluate, MLflow
parent/child runs, the registry alias, a diverging trial, a multi-objective Pareto front submitted
with ``ray job submit``, and a sweep whose driver is killed and started again.

Trials are tiny (4 training steps, 2 pairs per defect type, a few segmentation steps): the numbers
are meaningless, the wiring is what is tested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from defectforge.config import resolve_config

TINY = ["train.steps=4", "train.checkpoint_every=2", "train.batch_size=4", "evaluation.feature_extractor=randfeat",
        "evaluation.n_per_defect=2", "evaluation.seg_steps=6", "evaluation.seg_seeds=1", "sampling.steps=3"]


def _space(tmp_path: Path, lrs: list[float]) -> Path:
    # "1.0e+30", not "1e+30": YAML 1.1 reads a float without a dot in the mantissa as a string.
    path = tmp_path / "space.yaml"
    values = [f"{lr:.4e}" for lr in lrs]
    path.write_text("method: defect-gen\nparameters:\n  train.lr:\n    type: categorical\n"
                    f"    choices: [{', '.join(values)}]\n"
                    "points_to_evaluate:\n" + "".join(f"  - {{train.lr: {v}}}\n" for v in values))
    return path


def _children(uri: str, sweep: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("defectforge/defect-gen")
    return client.search_runs([exp.experiment_id], f"tags.`defectforge.sweep` = '{sweep}' and "
                                                   "tags.`defectforge.kind` = 'trial'")


def test_sweep_logs_runs_registers_best_and_survives_a_diverging_trial(ray_session, synth_root, tmp_path):
    from defectforge.sweep.run import sweep

    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=[
        f"data.path={synth_root}", "data.products=[fabric]", f"tracking.run_root={tmp_path}",
        f"sweep.space={_space(tmp_path, [0.0005, 1e30])}", "sweep.num_trials=2", "sweep.name=nan",
        "sweep.scheduler=none", "sweep.max_concurrent=1", *TINY])
    summary = sweep(cfg, summary_json=tmp_path / "s.json")
    [study] = summary["studies"]
    by_lr = {t["params"]["train.lr"]: t for t in study["trials"]}
    assert by_lr[0.0005]["status"] == "done" and isinstance(by_lr[0.0005]["seg_gain"], float)
    assert by_lr[1e30]["status"] == "error" and "non-finite loss" in by_lr[1e30]["error"]

    uri = summary["tracking_uri"]
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_done"] == 1
    children = _children(uri, "nan-fabric")  # per-product mode: one study per product
    assert len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    status = sorted(c.info.status for c in children)
    assert status == ["FAILED", "FINISHED"]
    done = next(c for c in children if c.info.status == "FINISHED")
    assert any(k.endswith("seg_gain_pixel_ap") or k.startswith("fid_randfeat") for k in done.data.metrics)
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "non-finite loss" in failed.data.tags["defectforge.error"]
    arts = [a.path for a in client.list_artifacts(parent.info.run_id, "results")]
    assert "results/table.txt" in arts and "results/tradeoff.png" in arts

    version = client.get_model_version_by_alias("defectforge-defect-gen-fabric", "best")
    assert version.tags["defectforge.run_id"] == done.info.run_id
    from defectforge import tracking

    with tracking.active(uri):
        model = mlflow.pyfunc.load_model("models:/defectforge-defect-gen-fabric@best")
    out = model.predict({"product": ["fabric"], "defect": ["hole"], "seed": [0]})
    assert len(out) == 1


def test_ray_job_submit_runs_a_multi_objective_sweep_to_succeeded(ray_head, synth_root, tmp_path):
    """The front door as users take it: ``ray job submit --working-dir . -- python
    jobs/sweep_defectgen.py`` against the session's head (``ray start --head``), waited on until
    SUCCEEDED, here with two objectives (KID down, LPIPS diversity up): the sweep returns a Pareto
    front and logs its plot. The job's logs show progress, and the driver shipped the uploaded
    package to the workers (the job does not rely on the local install)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from defectforge.sweep.objectives import dominates, parse_objectives

    repo = Path(__file__).resolve().parents[1]
    submission_id = f"defectforge-test-{uuid.uuid4().hex[:8]}"
    objective = "kid_randfeat:min,lpips_randnet:max"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard,
           "--submission-id", submission_id, "--working-dir", ".", "--",
           "python", "jobs/sweep_defectgen.py", "--data", str(synth_root), "--products", "fabric", "--trials", "2",
           "--concurrency", "1", "--name", "mo", "--objective", objective, "--run-root", str(tmp_path),
           "--summary-json", str(tmp_path / "mo.json"), f"--space={_space(tmp_path, [0.0005, 0.002])}",
           "sweep.scheduler=none", "evaluation.segmentation=false", *TINY]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=1200)  # streams logs, waits
    jobs = JobSubmissionClient(ray_head.dashboard)
    status, logs = jobs.get_job_status(submission_id), jobs.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}\n{done.stderr[-2000:]}"
    assert done.returncode == 0
    assert "shipping" in logs and "py_modules" in logs  # the uploaded package reached the workers
    assert "[sweep] mo: 2 trial(s) per study" in logs and "Pareto front of mo-fabric" in logs

    summary = json.loads((tmp_path / "mo.json").read_text())
    [study] = summary["studies"]
    front = study["pareto_front"]
    objectives = parse_objectives(objective)
    finished = [t for t in study["trials"] if t["status"] == "done"]
    assert len(finished) == 2 and front
    for r in front:  # nothing on the front is dominated; everything off it is
        assert not any(dominates(o, r, objectives) for o in finished)
    for r in finished:
        if r not in front:
            assert any(dominates(f, r, objectives) for f in front)
    client = mlflow.MlflowClient(summary["tracking_uri"])
    arts = [a.path for a in client.list_artifacts(summary["parent_run_id"], "results")]
    assert "results/pareto.png" in arts
    assert [c.info.status for c in _children(summary["tracking_uri"], "mo-fabric")] == ["FINISHED"] * 2


def test_killed_sweep_resumes_and_runs_every_trial_once(ray_session, synth_root, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    job = Path(__file__).resolve().parents[1] / "jobs" / "sweep_defectgen.py"
    cmd = [sys.executable, str(job), "--data", str(synth_root), "--products", "fabric", "--trials", "2",
           "--concurrency", "1", "--name", "rs", "--run-root", str(tmp_path), "--summary-json",
           str(tmp_path / "rs.json"), f"--space={_space(tmp_path, [0.0005, 0.002])}",
           "sweep.scheduler=none", *TINY]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # Kill the driver as soon as the first trial's MLflow run is FINISHED: mid-sweep, and usually
    # before Tune has recorded that trial's result, so the restored sweep starts it again.
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        # (MLflow is only read once a trial is evaluating: the driver has created the database by then.)
        evaluating = list((tmp_path / "sweeps" / "eval").glob("rs-fabric-*"))
        if evaluating and any(c.info.status == "FINISHED" for c in _children(uri, "rs-fabric")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {c.data.tags["defectforge.trial_id"]: c.info.status for c in _children(uri, "rs-fabric")}
    assert list(before.values()).count("FINISHED") < 2  # the sweep really was interrupted
    evaluated = {t: (tmp_path / "sweeps" / "eval" / f"rs-fabric-{t}" / "summary.json").stat().st_mtime_ns
                 for t, status in before.items() if status == "FINISHED"}

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    children = _children(uri, "rs-fabric")
    ids = [c.data.tags["defectforge.trial_id"] for c in children]
    after = {c.data.tags["defectforge.trial_id"]: c.info.status for c in children}
    detail = f"before the kill {before}, after the restore {after}\n{again.stdout[-6000:]}"
    assert len(ids) == 2 and len(set(ids)) == 2, detail  # no trial twice, no MLflow run duplicated
    assert all(c.info.status == "FINISHED" for c in children), detail
    for trial_id, mtime in evaluated.items():  # finished trials were not re-run (nor re-evaluated)
        assert trial_id in ids
        summary_file = tmp_path / "sweeps" / "eval" / f"rs-fabric-{trial_id}" / "summary.json"
        assert summary_file.stat().st_mtime_ns == mtime, detail
    summary = json.loads((tmp_path / "rs.json").read_text())
    assert sorted(t["status"] for t in summary["studies"][0]["trials"]) == ["done"] * 2
