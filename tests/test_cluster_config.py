"""cluster.yaml and the cluster-side checks (issue 18): the launcher config validates against the
schema Ray ships, declares what the sweeps rely on, and a multi-node cluster refuses storage that
is not shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_cluster(), schema)


def test_cluster_yaml_declares_what_the_sweeps_rely_on():
    from defectforge.sweep.runner import DRIVER_RESOURCE

    cluster = _cluster()
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must run no training"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "GPU workers scale from zero"
    assert all({"CPU", "GPU", "memory"} <= set(t["resources"]) for t in gpu)
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu)
    drivers = [t for t in types.values() if t["resources"].get(DRIVER_RESOURCE, 0) > 0]
    assert drivers and all(t["resources"].get("GPU", 0) == 0 for t in drivers)
    assert all(t["min_workers"] >= 1 for t in drivers), "a driver node is up when jobs start"
    assert all(t["max_workers"] <= cluster["max_workers"] for t in types.values())
    assert cluster["idle_timeout_minutes"] > 0
    text = (ROOT / "cluster.yaml").read_text()
    # MLflow on the head, on the private address, and the jobs find it; shared storage marked.
    assert "mlflow server" in text and "0.0.0.0" not in text
    assert "MLFLOW_TRACKING_URI=" in text and "DEFECTFORGE_STORAGE_PATH=" in text
    assert "DEFECTFORGE_SHARED_FS=/mnt/shared" in text and "DEFECTFORGE_TRIAL_RESOURCE=trial_driver" in text
    import ray

    assert f'"ray[default,train,tune,data]=={ray.__version__}"' in text, "the cluster's Ray must be the tested one"


def test_storage_must_be_a_path_and_on_a_shared_mount_on_a_multi_node_cluster(monkeypatch, tmp_path):
    from defectforge import cluster
    from defectforge.errors import ConfigError

    with pytest.raises(ConfigError, match="sweep.storage_path: s3://b/x is a URI.*DEFECTFORGE_SHARED_FS"):
        cluster.check_storage_path("s3://b/x", "sweep.storage_path")
    cluster.check_storage_path("/mnt/shared/x", "sweep.storage_path")
    monkeypatch.delenv(cluster.SHARED_FS_ENV, raising=False)
    monkeypatch.setattr(cluster, "alive_nodes", lambda: 1)
    cluster.check_shared_storage(str(tmp_path / "x"), "sweep.storage_path")  # one machine: fine
    monkeypatch.setattr(cluster, "alive_nodes", lambda: 3)
    with pytest.raises(ConfigError, match=r"is not on a shared mount \(DEFECTFORGE_SHARED_FS: none\), but the "
                                          r"cluster has 3 nodes.*DEFECTFORGE_STORAGE_PATH"):
        cluster.check_shared_storage(str(tmp_path / "x"), "sweep.storage_path")
    shared = tmp_path / "shared"
    monkeypatch.setenv(cluster.SHARED_FS_ENV, str(shared))
    cluster.check_shared_storage(str(shared / "defectforge" / "ray"), "sweep.storage_path")
    with pytest.raises(ConfigError, match="not on a shared mount"):  # a stray local path on the cluster
        cluster.check_shared_storage(str(tmp_path / "home" / "x"), "sweep.storage_path")


def test_each_run_root_gets_its_own_folder_under_a_clusters_storage_root(tmp_path):
    """Ray Train resumes ``<storage>/<run name>`` and run names are fixed per product: two run
    roots sharing one storage folder would resume each other's checkpoints."""
    from defectforge.cluster import storage_for

    a = storage_for(str(tmp_path / "ray"), tmp_path / "x" / "runs", "train")
    b = storage_for(str(tmp_path / "ray"), tmp_path / "y" / "runs", "train")
    assert a != b and Path(a).parent == Path(b).parent == tmp_path / "ray" / "train"
    assert a == storage_for(str(tmp_path / "ray"), tmp_path / "x" / "runs", "train")  # stable: resumable
    assert Path(storage_for(str(tmp_path / "ray"), tmp_path / "x" / "runs", "sweeps")).parent.name == "sweeps"


def test_gpu_hours_count_the_gpus_a_trial_held():
    from defectforge.config import resolve_config
    from defectforge.sweep.runner import gpu_hours

    cpu = resolve_config(method="defect-gen", preset="tiny")
    assert gpu_hours(cpu, 3600.0, 3600.0) == 0.0
    gpu = resolve_config(method="defect-gen", preset="tiny", overrides=[
        "train.scaling.use_gpu=true", "train.scaling.num_workers=2", "evaluation.num_gpus_per_actor=0.5"])
    # 2 Train workers x 1 GPU for 30 min + 1 actor x 0.5 GPU for 1 h
    assert gpu_hours(gpu, 1800.0, 3600.0) == pytest.approx(1.0 + 0.5)


def test_a_sweep_removes_leaked_placement_groups_at_start_while_it_runs_and_at_the_end(monkeypatch):
    """A killed driver's Train controller can reserve its placement group after the restored sweep
    started: the cleanup must keep running while the sweep does, not only once at its start."""
    import threading
    import time

    from defectforge import cluster

    calls: list[float] = []
    monkeypatch.setattr(cluster, "remove_leaked_placement_groups", lambda log=print: calls.append(time.monotonic()))
    with cluster.removing_leaked_placement_groups(every_s=0.05):
        assert len(calls) == 1  # at the start, before the block's work
        deadline = time.monotonic() + 10
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 4  # again and again while the block runs
        left = time.monotonic()
    assert calls[-1] >= left  # a last pass as the block ends
    n = len(calls)
    time.sleep(0.2)
    assert len(calls) == n  # the background thread stopped with the block
    assert not any(t.name == "defectforge-pg-cleanup" for t in threading.enumerate())


def test_a_failing_placement_group_cleanup_is_logged_and_never_ends_the_sweep(monkeypatch):
    from defectforge import cluster

    def boom(log=print):
        raise RuntimeError("the group was removed meanwhile")

    monkeypatch.setattr(cluster, "remove_leaked_placement_groups", boom)
    logged: list[str] = []
    with pytest.raises(KeyError, match="the sweep's own error"):
        with cluster.removing_leaked_placement_groups(log=logged.append, every_s=60):
            raise KeyError("the sweep's own error")  # not masked by the failing cleanup at the end
    assert len(logged) == 2 and all("cleanup failed (RuntimeError" in m for m in logged)


def test_a_cluster_that_cannot_be_joined_is_one_clear_error(monkeypatch):
    """``ensure_ray``: a failing ``ray.init`` (another user's token-auth head, a dead address)
    becomes a ``ClusterError`` naming the address tried and how to start a private cluster."""
    import ray

    from defectforge.cluster import ensure_ray
    from defectforge.errors import ClusterError, DefectforgeError

    calls = []

    def refuse(address=None, **kw):
        calls.append(address)
        raise ConnectionError("InvalidAuthToken: token mismatch")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    with pytest.raises(ClusterError, match=r"'10\.0\.0\.9:6379'.*InvalidAuthToken.*RAY_ADDRESS=local") as e:
        ensure_ray()
    assert isinstance(e.value, DefectforgeError) and isinstance(e.value.__cause__, ConnectionError)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ClusterError, match=r"none given.*`ray start`.*RAY_ADDRESS=local"):
        ensure_ray()
    assert calls == ["10.0.0.9:6379", None]


def test_gpu_check_treats_ray_address_local_as_this_machine(monkeypatch):
    """``RAY_ADDRESS=local`` starts a cluster here, so a GPU request is checked against this
    machine's devices (it is not a remote cluster whose workers may have GPUs)."""
    import ray
    import torch

    from defectforge.cluster import check_gpus_available
    from defectforge.errors import DeviceError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(DeviceError, match="this machine"):
        check_gpus_available(1, "train.scaling.use_gpu")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    check_gpus_available(1, "train.scaling.use_gpu")  # a remote cluster is not second-guessed
