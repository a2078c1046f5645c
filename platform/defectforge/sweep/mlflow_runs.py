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

from defectforge import tracking
from defectforge.sweep.objectives import objective_values
from defectforge.tracking import log_metrics  # noqa: F401  (re-exported for sweep code)

SWEEP_TAG = "defectforge.sweep"
TRIAL_TAG = "defectforge.trial_id"
RESULT_TAG = "defectforge.trial_result"
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
    run_id, _ = tracking.reopen_or_create_run(
        uri, experiment, f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{SWEEP_TAG}` = '{sweep_name}'",
        f"{sweep_name}-{trial_id}",
        {PARENT_TAG: parent_id, SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id, "defectforge.kind": "trial"}, params)
    return run_id


def finish(uri: str, run_id: str, error: str | None = None, trial_result: dict[str, Any] | None = None) -> None:
    """End a run FINISHED (or FAILED with ``error`` as a tag). ``trial_result`` (what a trial
    reports to Tune besides the objectives) is kept as a tag so that ``finished_trial`` can
    report it again without re-running the trial."""
    client = mlflow.MlflowClient(uri)
    if error:
        client.set_tag(run_id, "defectforge.error", error[:4000])
    if trial_result is not None:
        client.set_tag(run_id, RESULT_TAG, json.dumps(trial_result))
    client.set_terminated(run_id, "FAILED" if error else "FINISHED")


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
