"""MLflow conventions that commands rely on: the URI each command resolves is its own."""

from __future__ import annotations

import os

import mlflow

from defectforge import tracking


def test_two_commands_in_one_process_keep_their_own_tracking_uri(tmp_path, monkeypatch):
    """MLflow 3's set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ, which defectforge
    reads as the user's override: a command must not leave it behind for the next one."""
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    a = tracking.setup(None, tmp_path / "a", "defectforge/x")
    with tracking.start_run(a, "defectforge/x", {"train": {"lr": 0.1}}, "first"):
        mlflow.log_metric("m", 1.0)
    assert tracking.ENV_URI not in os.environ
    b = tracking.setup(None, tmp_path / "b", "defectforge/x")
    assert a != b and b.endswith(str(tmp_path / "b" / "mlflow.db"))
    runs_a = mlflow.MlflowClient(a).search_runs([mlflow.MlflowClient(a).get_experiment_by_name("defectforge/x")
                                                 .experiment_id])
    assert [r.data.params["train.lr"] for r in runs_a] == ["0.1"]


def test_active_restores_a_user_set_uri(tmp_path, monkeypatch):
    user = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv(tracking.ENV_URI, user)
    assert tracking.tracking_uri("http://ignored:5000") == user  # the user's env var wins
    with tracking.active(f"sqlite:///{tmp_path / 'other.db'}"):
        assert mlflow.get_tracking_uri().endswith("other.db")
    assert os.environ[tracking.ENV_URI] == user
