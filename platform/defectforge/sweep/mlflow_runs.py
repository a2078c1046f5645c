"""MLflow side of a sweep: one parent run per sweep, one child run per trial, the registry alias.

Why runs are found by tag before they are created: a sweep that is restored after its driver
died re-enters the same trials; looking the parent up by ``defectforge.sweep`` and each child by
``defectforge.trial_id`` means no MLflow run is ever duplicated. (Ray's ``MLflowLoggerCallback``
keys its runs in memory and opens a second run for a trial that restarts, and its run ids are not
visible to the trial, which has to attach the checkpoint and sample grid; hence this module.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from ray.tune import Callback

from defectforge import tracking
from defectforge.sweep.objectives import objective_values
from defectforge.tracking import log_metrics  # noqa: F401  (re-exported for sweep code)

SWEEP_TAG = "defectforge.sweep"
TRIAL_TAG = "defectforge.trial_id"
RESULT_TAG = "defectforge.trial_result"
END_REASON_TAG = "defectforge.end_reason"
LOST_REASON = "its Tune trial was lost when the sweep driver was interrupted"
PARENT_TAG = "mlflow.parentRunId"


def parent_run(uri: str, experiment: str, sweep_name: str, cfg_dict: dict[str, Any],
               space_meta: dict[str, Any]) -> str:
    """The sweep's parent run: found by its tag (a resumed sweep) or created."""
    run_id, created = tracking.reopen_or_create_run(
        uri, experiment, f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`defectforge.kind` = 'sweep'", sweep_name,
        {SWEEP_TAG: sweep_name, "defectforge.kind": "sweep", "defectforge.method": cfg_dict["method"]["name"]},
        tracking.flatten(cfg_dict))
    if created:
        mlflow.MlflowClient(uri).log_dict(run_id, space_meta, "search_space.json")
    return run_id


def child_run(uri: str, experiment: str, sweep_name: str, parent_id: str, trial_id: str,
              params: dict[str, Any]) -> str:
    """The trial's child run: found by trial id (a restarted trial) or created under the parent."""
    run_id, created = tracking.reopen_or_create_run(
        uri, experiment, f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{SWEEP_TAG}` = '{sweep_name}'",
        f"{sweep_name}-{trial_id}",
        {PARENT_TAG: parent_id, SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id, "defectforge.kind": "trial"}, params)
    if not created:  # a restarted trial: why it ended last time no longer holds
        client = mlflow.MlflowClient(uri)
        if END_REASON_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, END_REASON_TAG)
    return run_id


def pretraining_run(uri: str, experiment: str, sweep_name: str, parent_id: str, name: str,
                    params: dict[str, Any]) -> str:
    """The one MLflow run of a study's pretraining (``defectforge.kind`` = pretraining), under the
    parent, found again by its name when a restored sweep trains it after a crash."""
    run_id, _ = tracking.reopen_or_create_run(
        uri, experiment, f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`defectforge.pretraining` = '{name}'",
        name, {PARENT_TAG: parent_id, SWEEP_TAG: sweep_name, "defectforge.kind": "pretraining",
               "defectforge.pretraining": name}, params)
    return run_id


def finish(uri: str, run_id: str, error: str | None = None, trial_result: dict[str, Any] | None = None,
           if_running: bool = False) -> None:
    """End a run FINISHED (or FAILED with ``error`` as a tag). ``trial_result`` (what a trial
    reports to Tune besides the objectives) is kept as a tag so that ``finished_trial`` can
    report it again without re-running the trial.

    ``if_running``: leave a run that is no longer RUNNING as it is. A trial's error path uses it:
    when ASHA stops a trial, its thread dies inside training and reaches that path while
    ``CloseTrialRuns`` closes its run KILLED with the reason; the trial's FAILED came last, even
    after the sweep-end pass that mends it, and the stopped trial's run stayed FAILED (seen in CI
    on 2026-12-07, test_asha_stopped_trial_is_killed_with_its_reason)."""
    client = mlflow.MlflowClient(uri)
    if if_running and client.get_run(run_id).info.status != "RUNNING":
        return
    if error:
        client.set_tag(run_id, "defectforge.error", error[:4000])
    if trial_result is not None:
        client.set_tag(run_id, RESULT_TAG, json.dumps(trial_result))
    client.set_terminated(run_id, "FAILED" if error else "FINISHED")


def close_child(uri: str, experiment: str, sweep_name: str, trial_id: str, status: str, reason: str,
                replace: tuple[str, ...] = ("RUNNING",)) -> str | None:
    """End the trial's child run ``status`` (FINISHED, FAILED, KILLED) with ``reason`` as the tag
    ``defectforge.end_reason`` (and ``defectforge.error`` when FAILED); returns its run id, or None
    when there is no such run or nothing to change.

    Why: a trial that Tune stops (ASHA) or loses (its actor died, the driver was killed) never
    reaches its own ``finish``; its run would stay RUNNING forever. ``only_running``: touch the run
    ``replace``: the run statuses it may change (the Tune callback: only a RUNNING run; the
    sweep-end pass also turns a FAILED run of a stopped trial into KILLED)."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                                    f"tags.`{SWEEP_TAG}` = '{sweep_name}'", max_results=1)
    if not found:
        return None
    run = found[0]
    if run.info.status == status or run.info.status not in replace:
        return None
    client.set_tag(run.info.run_id, END_REASON_TAG, reason[:4000])
    if status == "FAILED" and "defectforge.error" not in run.data.tags:
        client.set_tag(run.info.run_id, "defectforge.error", reason[:4000])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def close_study_runs(uri: str, experiment: str, sweep_name: str,
                     outcomes: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The sweep-end pass: every child run of study ``sweep_name`` ends as Tune says its trial did.

    ``outcomes`` maps trial id -> (status, reason) from the study's final ResultGrid. A trial that
    finished already closed its own run (left alone unless still RUNNING); an errored trial whose
    run is still RUNNING becomes FAILED; a stopped trial becomes KILLED, also if its run was marked
    FAILED while its actor was torn down (a FINISHED run holds a whole result and stays). A RUNNING
    child run whose trial id is not in the ResultGrid belonged to a trial lost with a killed driver
    (Tune's state did not record it): it becomes KILLED with that reason. Runs after a
    normal end and after a restore alike. Returns {trial id: new status} of the runs it changed."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    changed = {}
    for trial_id, (status, reason) in outcomes.items():
        replace = ("RUNNING", "FAILED") if status == "KILLED" else ("RUNNING",)
        if close_child(uri, experiment, sweep_name, trial_id, status, reason, replace=replace):
            changed[trial_id] = status
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`defectforge.kind` = 'trial' "
                              "and attributes.status = 'RUNNING'")
    for run in runs:
        trial_id = run.data.tags.get(TRIAL_TAG)
        if trial_id not in outcomes:
            reason = f"{LOST_REASON} (not in the restored sweep's state)"
            client.set_tag(run.info.run_id, END_REASON_TAG, reason)
            client.set_terminated(run.info.run_id, "KILLED")
            changed[trial_id] = "KILLED"
    return changed


def lost_trials(uri: str, experiment: str, sweep_name: str) -> list[str]:
    """Trial ids of study ``sweep_name`` whose child run ``close_study_runs`` closed as lost, in
    this driver or an earlier one: read from the runs' end reason, so a study restored after the
    driver that closed them still names them (its ResultGrid never had them)."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_name}' and "
                                                   "tags.`defectforge.kind` = 'trial'")
    return sorted(r.data.tags[TRIAL_TAG] for r in runs
                  if r.data.tags.get(END_REASON_TAG, "").startswith(LOST_REASON) and TRIAL_TAG in r.data.tags)


def stop_reason(stopped_by: str, last: dict[str, Any]) -> str:
    """The end reason of a scheduler-stopped trial: who stopped it, at which report, at what loss.

    One wording for both closers (the Tune callback and the after-``fit`` sweep over the
    ResultGrid, which closes what the callback did not reach), so a run's reason never depends on
    which of the two got there first."""
    where = f"training_iteration {last.get('training_iteration') or '?'}"
    if isinstance(last.get("loss"), (int, float)):
        where += f", loss {last['loss']:.4g}"
    return f"stopped by {stopped_by} at {where}"


class CloseTrialRuns(Callback):
    """Tune callback that closes a trial's child run as soon as Tune ends the trial.

    ``on_trial_complete`` runs both for a trial whose function returned (its run is already
    FINISHED: left alone) and for one the scheduler stopped (its run is still RUNNING: KILLED with
    ``stopped_by`` and where it stopped as the reason). ``on_trial_error`` runs once a trial has
    used up its retries: FAILED with Tune's error if the trial could not say so itself (its actor
    died). Module-level so that Tune can pickle it into the sweep's state.
    """

    def __init__(self, uri: str, experiment: str, sweep_name: str, stopped_by: str):
        self.uri, self.experiment, self.sweep_name, self.stopped_by = uri, experiment, sweep_name, stopped_by

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        close_child(self.uri, self.experiment, self.sweep_name, trial.trial_id, "KILLED",
                    stop_reason(self.stopped_by, trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from defectforge.sweep.runner import _short_error

        error = None
        try:
            error = trial.get_error()
        except Exception:  # noqa: BLE001 - the reason is best effort; the run must still close
            pass
        close_child(self.uri, self.experiment, self.sweep_name, trial.trial_id, "FAILED",
                    f"trial errored: {_short_error(error) or 'see the trial error file ' + str(trial.error_file)}")


def finished_trial(uri: str, experiment: str, sweep_name: str, trial_id: str
                   ) -> tuple[dict[str, float], dict[str, Any]] | None:
    """(objective values, trial result) of a trial whose child run already FINISHED, else None.

    The objectives come from the evaluation summary the trial logged (``evaluation/summary.json``),
    the rest from the tag ``finish`` set; both are written before the run is marked FINISHED.
    """
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                                    f"tags.`{SWEEP_TAG}` = '{sweep_name}'", max_results=1)
    if not found or found[0].info.status != "FINISHED" or RESULT_TAG not in found[0].data.tags:
        return None
    run = found[0]
    summary = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/evaluation/summary.json")
    return objective_values(summary), json.loads(run.data.tags[RESULT_TAG])


def register_best(uri: str, run_id: str, generator_dir: str | Path, model_name: str,
                  alias: str = "best") -> str:
    """Log the generator as an MLflow pyfunc model on ``run_id``, register it, set ``alias``.

    The pyfunc wrapper (``defectforge.sweep.pyfunc``) loads the checkpoint directory with
    ``load_generator``; ``mlflow.pyfunc.load_model("models:/<name>@best")`` gives a model whose
    ``predict`` takes a table of (product, defect, seed) and returns pairs.
    Returns the registered version number.
    """
    from defectforge.sweep.pyfunc import GeneratorModel

    client = mlflow.MlflowClient(uri)
    with tracking.active(uri):
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=GeneratorModel(), artifacts={"generator": str(generator_dir)},
                pip_requirements=["defectforge"],
            )
        version = mlflow.register_model(info.model_uri, model_name)
    client.set_registered_model_alias(model_name, alias, version.version)
    client.set_model_version_tag(model_name, version.version, "defectforge.run_id", run_id)
    return str(version.version)


def write_json_artifact(uri: str, run_id: str, data: Any, name: str) -> None:
    mlflow.MlflowClient(uri).log_text(run_id, json.dumps(data, indent=2, default=str), name)
