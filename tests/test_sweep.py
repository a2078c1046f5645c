"""Sweeps end to end on the tiny preset: Tune + Optuna trials that train and evaluate, MLflow
parent/child runs, the registry alias, a diverging trial, a multi-objective Pareto front submitted
with ``ray job submit``, and a sweep whose driver is killed and started again.

Trials are tiny (4 training steps, 2 pairs per defect type, a few segmentation steps): the numbers
are meaningless, the wiring is what is tested.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
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
    # Beside the run root, not in it: a run root must be empty or defectforge's own (paths.py).
    path = tmp_path.with_name(tmp_path.name + "-spaces") / "space.yaml"
    path.parent.mkdir(exist_ok=True)
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


@pytest.mark.slow
def test_sweep_logs_runs_registers_best_and_survives_a_diverging_trial(ray_session, synth_root, tmp_path):
    from defectforge.sweep.run import sweep

    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=[
        f"data.path={synth_root}", "data.products=[fabric]", f"tracking.run_root={tmp_path}",
        f"sweep.space={_space(tmp_path, [0.0005, 1e30])}", "sweep.num_trials=2", "sweep.name=nan",
        "sweep.scheduler=none", "sweep.max_concurrent=2", *TINY])  # both at once, as on 2 CPUs
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


@pytest.mark.slow
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
           "--concurrency", "2", "--name", "mo", "--objective", objective, "--run-root", str(tmp_path),
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


@pytest.mark.slow
def test_killed_sweep_resumes_and_runs_every_trial_once(ray_session, synth_root, tmp_path):
    """Also issue 10's "a killed-and-restored sweep trains none twice": the two trials differ only
    in u (sampling-time), so the second reuses the first's generator, before or after the kill."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    job = Path(__file__).resolve().parents[1] / "jobs" / "sweep_defectgen.py"
    space = _space(tmp_path, [0.0005])
    space.write_text("method: defect-gen\nparameters:\n  method.u: {type: categorical, choices: [100, 300]}\n"
                     "points_to_evaluate:\n  - {method.u: 100}\n  - {method.u: 300}\n")
    cmd = [sys.executable, str(job), "--data", str(synth_root), "--products", "fabric", "--trials", "2",
           "--concurrency", "1", "--name", "rs", "--run-root", str(tmp_path), "--summary-json",
           str(tmp_path / "rs.json"), f"--space={space}", "sweep.scheduler=none", *TINY]
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
    trained = {str(p): p.stat().st_mtime_ns for p in trained_paths(tmp_path)}
    assert any(p.endswith("TRAINED.json") for p in trained)  # the first trial's generator is done

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
    # Trained once: one generator for both trials, its marker and weights untouched by the restore.
    tags = [c.data.tags for c in children]
    assert len({t["defectforge.train_key"] for t in tags}) == 1, detail
    assert sorted(t["defectforge.trained_here"] for t in tags) == ["false", "true"], detail
    assert {str(p): p.stat().st_mtime_ns for p in trained_paths(tmp_path)} == trained, detail


def trained_paths(root: Path) -> list[Path]:
    """Every file of the sweep's trainings: train-once markers and the Train runs' checkpoints."""
    return [p for d in ("train-once", "train") for p in (root / "sweeps" / d).rglob("*") if p.is_file()]


def _spec(name: str, product: str, tmp_path: Path):
    from defectforge.sweep.objectives import parse_objectives
    from defectforge.sweep.runner import StudySpec

    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=[f"data.products=[{product}]"])
    return StudySpec(name=name, products=[product], cfg=cfg.to_dict(), space_source=str(_space(tmp_path, [0.001])),
                     storage=str(tmp_path / "sweeps"), uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                     experiment="defectforge/defect-gen", parent_run_id="-",
                     objectives=parse_objectives("kid_randfeat"))


def test_each_study_registers_its_trainable_under_its_own_name(ray_session, tmp_path):
    """Issue 19's cause: Tune registers a trainable job-wide under its name and builds each trial's
    actor from what that name holds when the actor starts; concurrent studies named alike
    (``_trial``) overwrote each other's spec. Each study's name is its own, and the same again
    for the same study (``Tuner.restore`` requires the name it was started with)."""
    from ray import tune
    from ray.tune.experiment import Experiment
    from ray.tune.registry import _has_trainable

    from defectforge.sweep.runner import study_trainable

    specs = [_spec(f"reg-{p}", p, tmp_path) for p in ("fabric", "metal")]
    names = [Experiment.register_if_needed(tune.with_resources(study_trainable(s), {"cpu": 0.01})) for s in specs]
    assert names == ["defectforge-trial-reg-fabric", "defectforge-trial-reg-metal"]
    assert all(_has_trainable(n) for n in names)
    assert Experiment.get_trainable_name(study_trainable(specs[0])) == names[0]


def test_a_trial_handed_another_studys_spec_fails_before_training(ray_session, tmp_path):
    """The guard at the start of a trial: Tune's record of the trial's study (its experiment name)
    must be the spec's study, else the trial errors before it opens an MLflow run or trains."""
    from ray import tune

    from defectforge.sweep.runner import study_trainable

    metal = _spec("guard-metal", "metal", tmp_path)
    tuner = tune.Tuner(tune.with_resources(study_trainable(metal), {"cpu": 0.01}),
                       run_config=tune.RunConfig(name="guard-fabric", storage_path=str(tmp_path / "sweeps"), verbose=0))
    [result] = tuner.fit()
    assert result.error is not None and "refusing to train another study's product" in str(result.error)
    assert "'guard-fabric'" in str(result.error) and "'guard-metal'" in str(result.error)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweeps" / "train").exists()


@pytest.mark.slow
def test_asha_stopped_trial_is_killed_with_its_reason(ray_session, synth_root, tmp_path):
    """Issue 19 acceptance 2, end to end: ASHA stops a trial whose loss is worse at the first rung,
    and its child run ends KILLED with the reason, not RUNNING. Both trials share the seed, so
    they draw the same batches, timesteps and noise; only the learning rate differs (2e-3 against
    1e-12, i.e. no learning), so the second trial's loss after 4 steps is the higher one."""
    from defectforge.sweep.run import sweep

    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=[
        f"data.path={synth_root}", "data.products=[fabric]", f"tracking.run_root={tmp_path}",
        f"sweep.space={_space(tmp_path, [2e-3, 1e-12])}", "sweep.num_trials=2", "sweep.name=asha",
        "sweep.scheduler=asha", "sweep.grace_period=1", "sweep.max_concurrent=1", *TINY,
        "train.steps=8", "train.checkpoint_every=4", "train.warmup_steps=0", "evaluation.segmentation=false"])
    summary = sweep(cfg, summary_json=tmp_path / "asha.json")
    [study] = summary["studies"]
    by_lr = {t["params"]["train.lr"]: t for t in study["trials"]}
    assert by_lr[2e-3]["status"] == "done", json.dumps(study["trials"], default=str)
    runs = _children(summary["tracking_uri"], "asha-fabric")
    assert all(c.info.status != "RUNNING" for c in runs), [c.info.status for c in runs]
    stopped = [c for c in runs if c.info.status == "KILLED"]
    assert len(stopped) == 1, [(c.info.run_name, c.info.status, c.data.tags.get("defectforge.end_reason"))
                               for c in runs]
    assert stopped[0].data.tags["defectforge.end_reason"].startswith("stopped by ASHA at training_iteration")
    assert stopped[0].data.tags["defectforge.trial_id"] == by_lr[1e-12]["trial_id"]


def _assert_each_trial_on_its_own_product(tmp_path: Path, uri: str, sweep: str, summary: dict | None,
                                          products: list[str], detail: str = "") -> dict[str, list]:
    """Issue 19's checks, for every trial of a per-product sweep: its Train run folder, its MLflow
    run name and ``products`` param, and the products its generator checkpoints were built for
    name its own study's product; each trial id appears once; no child run is left RUNNING;
    scheduler-stopped trials are KILLED with the reason. Returns the child runs per study."""
    train_dirs = [d.name for d in (tmp_path / "sweeps" / "train").iterdir() if d.is_dir()]
    all_ids: list[str] = []
    runs_per_study = {}
    for product in products:
        study = f"{sweep}-{product}"
        children = _children(uri, study)
        runs_per_study[study] = children
        ids = [c.data.tags["defectforge.trial_id"] for c in children]
        all_ids += ids
        assert children, f"no trial of {study}\n{detail}"
        for c in children:
            tid = c.data.tags["defectforge.trial_id"]
            assert c.info.run_name == f"{study}-{tid}", detail
            assert c.data.params["products"] == product, f"{c.info.run_name}: {c.data.params['products']}\n{detail}"
            assert c.info.status != "RUNNING", f"{c.info.run_name} left RUNNING\n{detail}"
            if c.info.status == "KILLED":
                reason = c.data.tags["defectforge.end_reason"]
                assert reason.startswith(("stopped by ASHA", "its Tune trial was lost")), \
                    detail
        for c in children:  # a trial's Train run (train once: named by study + training key) is tagged
            train_run = c.data.tags.get("defectforge.train_run")
            if train_run is None:  # killed before it reached its training
                continue
            assert train_run.startswith(f"{study}-gen-"), f"{train_run} of {study}\n{detail}"
            for cfg_file in (tmp_path / "sweeps" / "train").glob(f"{train_run}/**/generator/config.json"):
                trained = json.loads(cfg_file.read_text())["context"]["products"]
                assert trained == [product], f"{cfg_file}: trained on {trained}\n{detail}"
        for d in train_dirs:
            assert d.startswith(tuple(f"{sweep}-{p}-gen-" for p in products)), d
    assert len(all_ids) == len(set(all_ids)), f"a trial id appears twice: {sorted(all_ids)}\n{detail}"
    assert sorted(d.rsplit("-", 1)[1] for d in train_dirs) == sorted(set(d.rsplit("-", 1)[1] for d in train_dirs))
    if summary is not None:
        by_id = {c.data.tags["defectforge.trial_id"]: c for cs in runs_per_study.values() for c in cs}
        for study in summary["studies"]:
            [product] = study["products"]
            assert study["name"] == f"{sweep}-{product}"
            # A kill that falls after a trial opened its run but before Tune's next save of its
            # state (at most every 10 s) loses the trial: Tune's restored state never had it, so
            # it is not in the summary; its run must be KILLED with that reason (seen in CI on
            # 2026-12-07: kill 1 fell in that window). Every other run is a summary trial, once.
            lost = sorted(c.data.tags["defectforge.trial_id"] for c in runs_per_study[study["name"]]
                          if c.data.tags.get("defectforge.end_reason", "").startswith("its Tune trial was lost"))
            in_mlflow = sorted(c.data.tags["defectforge.trial_id"] for c in runs_per_study[study["name"]])
            listed = sorted(t["trial_id"] for t in study["trials"])
            assert sorted(listed + lost) == in_mlflow, detail  # each trial exactly once
            assert sorted(study.get("lost", [])) == lost, detail  # and the summary names the lost ones
            for t in study["trials"]:
                run = by_id[t["trial_id"]]
                assert run.data.params["products"] == product, detail
                expected = {"done": "FINISHED", "error": "FAILED", "stopped": "KILLED"}[t["status"]]
                assert run.info.status == expected, f"{t['trial_id']} {t['status']} but run {run.info.status}\n{detail}"
                if t["status"] == "stopped":
                    assert run.data.tags["defectforge.end_reason"].startswith("stopped by ASHA"), detail
                if t["status"] == "done":
                    ckpt = json.loads((Path(t["checkpoint_dir"]) / "config.json").read_text())
                    assert ckpt["context"]["products"] == [product], detail
    return runs_per_study


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 396 s alone here (2026-12-02; 494 s with 3 trials per study); 2.5x by the day
def test_per_product_sweep_killed_three_times_runs_every_trial_once_on_its_own_product(ray_session, synth_root,
                                                                                       tmp_path):
    """Issue 19's kill test: the driver's process group is killed (as a crashed machine would)
    three times, each time once a trial more has started training than at the previous kill, then
    the sweep is run to its end. Every trial appears once, on its own study's product, and no
    child run is left RUNNING.

    It is also the test of the uninterrupted 2-product sweep (acceptance 1): with --concurrency 1
    the studies run one after the other, so the kills fall in fabric's two trainings and metal's
    first, and the last run trains metal's trials after fabric's (restored) study ran in the same
    driver, which is where the bug moved a study's trials to the other product; every trial is
    checked on its own product. (A separate uninterrupted 2-product sweep test took 5 min of CI and
    asserted a subset of this; it was folded in here to shorten CI. Two trials per study, not
    three: the same kills and checks, 396 s instead of 494 s alone here.)"""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    job = Path(__file__).resolve().parents[1] / "jobs" / "sweep_defectgen.py"
    cmd = [sys.executable, str(job), "--data", str(synth_root), "--products", "fabric,metal", "--trials", "2",
           "--concurrency", "1", "--name", "kt", "--run-root", str(tmp_path), "--summary-json",
           str(tmp_path / "kt.json"), f"--space={_space(tmp_path, [0.002, 0.0005])}",
           "sweep.scheduler=none", "evaluation.segmentation=false", *TINY]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = tmp_path / "sweeps" / "train"
    history = []
    for kill in range(3):
        seen = len(list(train.glob("kt-*"))) if train.is_dir() else 0
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            n = len(list(train.glob("kt-*"))) if train.is_dir() else 0
            if n > seen or n == 4:  # a new training started, or all 4 (2 products x 2 lrs) have
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"the sweep ended before kill {kill + 1} ({history})"
        time.sleep(2 * kill)  # three different moments: as training starts, a little later, later still
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        history.append(sorted(d.name for d in train.glob("kt-*")))

    # A hang guard, not a budget: the last run trains the trials still to do. RAY_DEDUP_LOGS=0:
    # Ray's driver otherwise folds similar lines of different workers into "[repeated Nx]".
    again = subprocess.run(cmd, env={**env, "RAY_DEDUP_LOGS": "0"}, capture_output=True, text=True, timeout=900)
    detail = f"Train folders at each kill {history}\n{again.stdout[-5000:]}\n{again.stderr[-2000:]}"
    assert again.returncode == 0, detail
    # Each training-progress line reaches the console once (Ray Train's print patch doubled them
    # in sweep trials: train.runner.fit_generator turns it off). Metal's second trial at least
    # trains in this last run: the third kill fell in metal's first training.
    # Keyed by worker pid too: a Train retry in new workers may print a step again, legitimately.
    progress = re.findall(r"pid=(\d+)\).*?\[(kt-\w+-gen-\w+)\] stage (\w+) step (\d+)/(\d+)", again.stdout)
    assert progress and len(progress) == len(set(progress)), f"{progress}\n{detail}"
    summary = json.loads((tmp_path / "kt.json").read_text())
    assert all(len(s["trials"]) == 2 for s in summary["studies"]), detail
    _assert_each_trial_on_its_own_product(tmp_path, uri, "kt", summary, ["fabric", "metal"], detail)


def test_results_table_lists_a_lost_trial_beside_the_trials_tune_knows():
    """A trial lost with a killed driver is in no ResultGrid; the table (printed, and the parent
    run's results/table.txt) still lists it, as ``lost``, so each KILLED run in MLflow has a row."""
    from defectforge.sweep.run import results_table

    summary = {"objectives": [{"metric": "seg_gain", "mode": "max"}], "studies": [
        {"name": "kt-fabric", "lost": ["d4f38249"], "trials": [
            {"study": "kt-fabric", "trial_id": "807d1609", "status": "done", "params": {"train.lr": 0.002},
             "seg_gain": 0.25, "loss": 0.5}]}]}
    lines = [line.split() for line in results_table(summary).splitlines()]
    assert lines[0] == ["study", "trial", "status", "lr", "seg_gain", "loss"]
    assert lines[1] == ["kt-fabric", "807d1609", "done", "0.002", "0.25", "0.5"]
    assert lines[2] == ["kt-fabric", "d4f38249", "lost", "-", "-", "-"]
    from defectforge.sweep.run import _csv  # the parent run's results/trials.csv lists it too

    csv_rows = list(csv.DictReader(io.StringIO(_csv(summary))))
    assert [(r["trial_id"], r["status"]) for r in csv_rows] == [("807d1609", "done"), ("d4f38249", "lost")]


def test_child_runs_are_closed_as_tune_ended_their_trials(tmp_path):
    """The sweep-end pass: a stopped trial's RUNNING (or teardown-FAILED) run becomes KILLED with the
    reason, an errored one FAILED, a FINISHED run stays, a run whose trial Tune lost becomes KILLED."""
    from defectforge import tracking
    from defectforge.sweep import mlflow_runs

    uri = tracking.setup(None, tmp_path, "defectforge/defect-gen", 30)
    exp = "defectforge/defect-gen"
    parent = mlflow_runs.parent_run(uri, exp, "cl", {"method": {"name": "defect-gen"}}, {})
    runs = {t: mlflow_runs.child_run(uri, exp, "cl-fabric", parent, t, {"products": "fabric"})
            for t in ("stopped", "torn", "errored", "done", "lost")}
    mlflow_runs.finish(uri, runs["done"], trial_result={"loss": 1.0})
    mlflow_runs.finish(uri, runs["torn"], error="RayActorError: the actor died")
    changed = mlflow_runs.close_study_runs(uri, exp, "cl-fabric", {
        "stopped": ("KILLED", "stopped by ASHA"), "torn": ("KILLED", "stopped by ASHA"),
        "errored": ("FAILED", "trial errored: boom"), "done": ("KILLED", "stopped by ASHA")})
    assert changed == {"stopped": "KILLED", "torn": "KILLED", "errored": "FAILED", "lost": "KILLED"}
    client = mlflow.MlflowClient(uri)
    got = {t: client.get_run(r) for t, r in runs.items()}
    assert {t: r.info.status for t, r in got.items()} == {"stopped": "KILLED", "torn": "KILLED", "errored": "FAILED",
                                                         "done": "FINISHED", "lost": "KILLED"}
    assert got["stopped"].data.tags["defectforge.end_reason"] == "stopped by ASHA"
    assert got["errored"].data.tags["defectforge.error"] == "trial errored: boom"
    assert "interrupted" in got["lost"].data.tags["defectforge.end_reason"]
    assert mlflow_runs.lost_trials(uri, exp, "cl-fabric") == ["lost"]
    # A stopped trial's thread reaching its error path after the callback closed its run: the run
    # keeps KILLED and its reason (if_running), as a run still RUNNING would not.
    mlflow_runs.finish(uri, runs["stopped"], error="RayTaskError: stopped", if_running=True)
    after = client.get_run(runs["stopped"])
    assert after.info.status == "KILLED" and "defectforge.error" not in after.data.tags
    assert after.data.tags["defectforge.end_reason"] == "stopped by ASHA"
    # A later restore's pass changes nothing, and the study still names its lost trial (its
    # ResultGrid never had it; the run says so).
    assert mlflow_runs.close_study_runs(uri, exp, "cl-fabric", {"done": ("FINISHED", "finished")}) == {}
    assert mlflow_runs.lost_trials(uri, exp, "cl-fabric") == ["lost"]
    assert "defectforge.end_reason" not in got["done"].data.tags
    # A restarted trial reopens its run: the old end reason goes.
    again = mlflow_runs.child_run(uri, exp, "cl-fabric", parent, "stopped", {"products": "fabric"})
    assert again == runs["stopped"] and "defectforge.end_reason" not in client.get_run(again).data.tags


@pytest.mark.parametrize(("overrides", "cpus"), [
    ([], 1.0),                                                   # 1 Train worker, 1 map task
    (["evaluation.num_actors=2"], 2.0),                          # the evaluation's two map tasks
    (["train.scaling.num_workers=3", "evaluation.num_actors=2"], 3.0),  # DDP on 3 workers
])
def test_a_trials_peak_is_its_training_or_its_evaluations_map_tasks(overrides, cpus):
    """Issue 12: a trial evaluating its own checkpoint needs no CPU beyond its map tasks, so the
    laptop presets run two trials at a time on 2 CPUs (one more CPU made every sweep sequential)."""
    from defectforge.sweep.runner import trial_resources

    cfg = resolve_config("defect-synth", "laptop", None, overrides)
    assert trial_resources(cfg) == {"CPU": cpus, "GPU": 0.0}
