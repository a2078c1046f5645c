"""A sweep on a simulated multi-node cluster (issue 18): trials spread over nodes, a node lost
mid-training does not lose the sweep, and local-only storage is refused at once.

The cluster is ``ray.cluster_utils.Cluster`` (several raylets on this machine): a head with no
CPU (as cluster.yaml's) and two worker nodes, each with one CPU, one ``trial_driver`` (the
custom resource trial coordinators ask for on a cluster) and one ``accel`` (a custom resource
standing in for a GPU: the Train workers ask for it through ``train.scaling.resources_per_worker``).
It runs in a child process, apart from the session's cluster, and is shut down at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SIM = r'''
import json, os, sys, threading, time
from pathlib import Path

os.environ.pop("RAY_ADDRESS", None)
import ray
from ray.cluster_utils import Cluster

synth, out, space = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=1, resources={"trial_driver": 1, "accel": 1}) for _ in range(2)]
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address
ray.init(address=cluster.address, log_to_driver=True)  # the Train workers' lines come here

from defectforge.config import resolve_config
from defectforge.errors import ConfigError
from defectforge.sweep.run import sweep

base = [f"data.path={synth}", "data.products=[fabric]", f"tracking.run_root={out / 'runs'}",
        "evaluation.feature_extractor=randfeat", "evaluation.segmentation=false", "evaluation.n_per_defect=4",
        "sweep.num_trials=2", "sweep.max_concurrent=2", "sweep.scheduler=none", f"sweep.space={space}",
        "sweep.register_model=false", "train.steps=120", "train.checkpoint_every=10", "train.batch_size=4",
        "train.log_every=10", "train.max_failures=3", "sweep.trial_max_failures=3",
        "train.scaling.resources_per_worker={CPU: 1, accel: 1}"]
report = {}

# 1. Local-only storage on a multi-node cluster: refused at once, saying what to set.
os.environ.pop("DEFECTFORGE_SHARED_FS", None)
t0 = time.time()
try:
    sweep(resolve_config(method="defect-gen", preset="tiny", overrides=[*base, "sweep.name=refused"]))
    report["refused"] = None
except ConfigError as exc:
    report["refused"] = str(exc)
report["refused_s"] = time.time() - t0

# 2. Storage on a "shared mount" (these nodes share this machine's disk): the sweep runs; once a training has
#    written a checkpoint, the worker node running a Train worker is removed.
os.environ["DEFECTFORGE_SHARED_FS"] = str(out)
removed, training_nodes = {}, set()
train_root = out / "runs" / "sweeps" / "train"  # the sweep's Train runs, one folder each

def registered(snapshot):
    try:
        return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError):  # being written
        return False

def remove_a_training_node():
    from ray.util.state import list_actors

    deadline, start = time.time() + 900, time.time()
    while time.time() < deadline and not removed:
        live = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "RayTrainWorker" in a.class_name]
        training_nodes.update(a.node_id for a in live)
        ckpts = list(train_root.glob("*/checkpoint_*"))
        runs_with_ckpt = {s.parent for s in train_root.glob("*/checkpoint_manager_snapshot.json") if registered(s)}
        # Once both nodes train at once and both trainings have a checkpoint Ray Train has registered
        # (so whichever node goes, its training can resume from one), or after 5 minutes, remove one
        # holding a Train worker. Races seen: waiting for any checkpoint, a trial lost before its
        # first restarted from step 0; waiting for both runs' checkpoint_* folders, a trial whose
        # driver went with the node (Tune retried it) restarted from step 0 too: the folder is
        # written before the controller records it in checkpoint_manager_snapshot.json, and a
        # restarted run resumes from what that file records.
        both = len(training_nodes) >= 2 and len(runs_with_ckpt) >= 2
        if ckpts and (both or time.time() - start > 300):
            for node in workers:
                if any(a.node_id == node.node_id for a in live):
                    cluster.remove_node(node)
                    removed["node_id"] = node.node_id
                    removed["after_checkpoints"] = len(ckpts)
                    return
        time.sleep(0.5)

killer = threading.Thread(target=remove_a_training_node, daemon=True)
killer.start()
summary = sweep(resolve_config(method="defect-gen", preset="tiny", overrides=[*base, "sweep.name=mn"]))
killer.join(timeout=5)
report["removed"] = removed
report["training_nodes"] = sorted(training_nodes)
report["trials"] = [{k: r.get(k) for k in ("status", "node_id", "error")} for s in summary["studies"]
                    for r in s["trials"]]
report["worker_nodes"] = [n.node_id for n in workers]
print("REPORT " + json.dumps(report), flush=True)
ray.shutdown()
cluster.shutdown()
'''


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_spreads_over_nodes_survives_a_lost_node_and_refuses_local_storage(synth_root, tmp_path):
    space = tmp_path / "space.yaml"
    # Two trials that differ in what they train (the learning rate), so both train.
    space.write_text("method: defect-gen\nparameters:\n  train.lr:\n    type: categorical\n"
                     "    choices: [1.0e-3, 5.0e-4]\npoints_to_evaluate:\n  - {train.lr: 1.0e-3}\n"
                     "  - {train.lr: 5.0e-4}\n")
    script = tmp_path / "sim.py"
    script.write_text(SIM)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DEFECTFORGE_SHARED_FS")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(synth_root), str(tmp_path / "out"), str(space)],
                          env=env, capture_output=True, text=True, timeout=1700, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-5000:] + proc.stderr[-5000:]
    report = json.loads(lines[-1][len("REPORT "):])

    assert report["refused"] and "not on a shared mount" in report["refused"], report["refused"]
    assert report["refused_s"] < 60, "the storage check must come before any training"
    assert report["removed"].get("node_id"), f"no node was removed mid-training: {report}"
    assert [t["status"] for t in report["trials"]] == ["done", "done"], report["trials"]
    # Both worker nodes trained at once (the Train workers ask for the one `accel` each node has),
    # and the sweep finished although one of them was removed mid-training: the lost trainings
    # resumed from their checkpoints on the node left (Ray Train's FailureConfig, Tune's retries).
    assert sorted(report["training_nodes"]) == sorted(report["worker_nodes"]), report
    assert {t["node_id"] for t in report["trials"]} <= set(report["worker_nodes"]) - {report["removed"]["node_id"]}
    # ... and the training that lost its worker went on from its last checkpoint, not from step 0.
    assert "resumed from checkpoint at stage 'diffusion'" in proc.stdout + proc.stderr, proc.stdout[-5000:]
    assert Path(tmp_path / "out" / "runs").is_dir()
