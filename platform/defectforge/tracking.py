"""MLflow conventions: where runs go, what they are called, how configs become params.

Why here and not scattered: every command (train, evaluate, sweep) logs the same way, and the
engineer picking a checkpoint in the MLflow UI relies on those names being predictable.

* URI: ``MLFLOW_TRACKING_URI`` wins; else ``tracking.uri``; else the embedded default
  ``sqlite:///<run_root>/mlflow.db`` with artifacts under ``<run_root>/mlartifacts`` (MLflow >= 3.13
  refuses the old ``./mlruns`` file store).
* Experiments: ``defectforge/<method>`` unless ``tracking.experiment`` names one.
* An unreachable tracking server fails *before* training, within ``tracking.timeout_s``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV_URI = "MLFLOW_TRACKING_URI"
MAX_PARAM_LEN = 500  # MLflow's limit on a param value


from defectforge.errors import TrackingError  # noqa: E402  (re-exported: ``tracking.TrackingError``)


def tracking_uri(uri: str | None = None, run_root: str | os.PathLike[str] = "runs") -> str:
    """The tracking URI in force: env var, then config, then the embedded SQLite default."""
    env = os.environ.get(ENV_URI)
    if env:
        return env
    if uri:
        return uri
    root = Path(run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(run_root: str | os.PathLike[str] = "runs") -> str:
    """Artifact root for experiments created against the embedded SQLite store."""
    return (Path(run_root).resolve() / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast when an HTTP(S) tracking server does not answer; a SQLite file must be creatable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - user-configured URI
                if resp.status >= 400:
                    raise TrackingError(f"MLflow server {uri} answered {resp.status} at /health")
        except urllib.error.HTTPError as exc:
            raise TrackingError(f"MLflow server {uri} answered HTTP {exc.code} at /health") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}). Start it (e.g. `mlflow server "
                f"--host 0.0.0.0 --port 5000` on the head node), fix tracking.uri / {ENV_URI}, or unset "
                "them to use the embedded SQLite store."
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow database folder {db.parent}: {exc}") from None
    elif uri.startswith("file:") or uri.startswith("./") or uri.startswith("/"):
        raise TrackingError(
            f"tracking URI {uri!r} is a file store, which MLflow >= 3.13 refuses; use "
            "sqlite:///<path>/mlflow.db or an http(s) server"
        )


def setup(uri: str | None, run_root: str | os.PathLike[str], experiment: str,
          timeout_s: float = 10.0) -> str:
    """Resolve and check the URI, make sure ``experiment`` exists; returns the URI.

    No global MLflow state is set here: every caller passes the URI on (``MlflowClient(uri)``,
    ``active(uri)``), so two commands in one process with different run roots stay apart.
    """
    import mlflow

    resolved = tracking_uri(uri, run_root)
    check_reachable(resolved, timeout_s)
    client = mlflow.MlflowClient(resolved)
    if client.get_experiment_by_name(experiment) is None:
        kwargs = {"artifact_location": artifact_location(run_root)} if resolved.startswith("sqlite:") else {}
        try:
            client.create_experiment(experiment, **kwargs)
        except Exception:  # created concurrently by another process
            if client.get_experiment_by_name(experiment) is None:
                raise
    return resolved


@contextmanager
def active(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``start_run``, ``log_model``, ``register_model``) pointed at ``uri``
    for the block, and the previous state restored after it.

    Why: ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``
    (MLflow 3), which this package reads as the user's override; left set, the URI of one command
    would silently capture every later command of the process and of its subprocesses.
    """
    import mlflow

    env_before, uri_before = os.environ.get(ENV_URI), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri_before)
        if env_before is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = env_before


def experiment_name(method: str, configured: str | None = None) -> str:
    return configured or f"defectforge/{method}"


def run_name(kind: str, method: str, products: list[str] | tuple[str, ...] | None = None,
             suffix: str | None = None) -> str:
    """``train-defect-gen-bottle+tile`` style names: the kind, the method, what it covers."""
    parts = [kind, method]
    if products:
        parts.append("+".join(products) if len(products) <= 3 else f"{len(products)}products")
    if suffix:
        parts.append(suffix)
    return "-".join(parts)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.0001", ...}`` with values cut to MLflow's param limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = str(value)
            out[name] = text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."
    return out


@contextmanager
def start_run(uri: str, experiment: str, cfg_dict: Mapping[str, Any] | None, run_name_: str,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run in ``experiment`` at ``uri`` with the flattened config as params and defectforge
    tags; MLflow's fluent logging calls inside the block go to it."""
    import mlflow

    all_tags = {"defectforge.version": _version()}
    all_tags.update(tags or {})
    with active(uri):
        exp = mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
        if exp is None:
            raise RuntimeError(f"MLflow experiment {experiment!r} does not exist (tracking.setup() first)")
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name_, tags=all_tags) as run:
            if cfg_dict:
                params = flatten(cfg_dict)
                items = list(params.items())
                for i in range(0, len(items), 100):  # log_params accepts at most 100 per call
                    mlflow.log_params(dict(items[i:i + 100]))
            yield run


def reopen_or_create_run(uri: str, experiment: str, tag_filter: str, run_name_: str, tags: Mapping[str, str],
                         params: Mapping[str, Any]) -> tuple[str, bool]:
    """The run matching ``tag_filter`` (set RUNNING again), else a new one with ``tags`` and ``params``.

    Why: a resumed training run, sweep or trial must land in its existing MLflow run, never a
    duplicate. Returns (run_id, created).
    """
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"MLflow experiment {experiment!r} does not exist (tracking.setup() first)")
    found = client.search_runs([exp.experiment_id], tag_filter, max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, False
    run_id = client.create_run(exp.experiment_id, run_name=run_name_, tags=dict(tags)).info.run_id
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id, True


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Log the finite numbers of ``metrics`` into an existing run (batched; NaN/inf left out)."""
    import math
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    client = mlflow.MlflowClient(uri)
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


def _version() -> str:
    from defectforge import __version__

    return __version__
