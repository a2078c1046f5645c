"""Defect-Gen through the shared Ray Train loop: DDP over 2 workers, and a killed run that resumes.

Both use real Ray Train worker actors (not local mode), so they exercise Ray's own checkpoint
storage and restore-by-name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from defectforge.config import resolve_config
from defectforge.methods.base import Conditions, SamplingOptions, load_generator


def _cfg(root, tmp_path, *overrides):
    return resolve_config(method="defect-gen", preset="tiny", overrides=[
        f"data.path={root}", "data.products=[fabric]", "train.batch_size=4", "train.log_every=1",
        f"tracking.run_root={tmp_path}", *overrides])


@pytest.mark.slow
def test_ddp_two_workers_trains_and_checkpoints(ray_session, synth_root, tmp_path):
    from defectforge.train.runner import train

    cfg = _cfg(synth_root, tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.scaling.num_workers=2")
    before = signal.getsignal(signal.SIGINT)
    [out] = train(cfg, tmp_path / "out", name="ddp", log_to_mlflow=False)
    assert out.ok, out.error
    # The run's Ctrl-C handler (Ray Train's, a closure over its controller) is gone with the run,
    # and so is the controller actor it kept alive (train.runner._sigint_handler_restored).
    assert signal.getsignal(signal.SIGINT) is before
    assert _alive_controllers() == [], "a finished run's TrainController actor is still alive"
    assert out.metrics["global_step"] == 4
    ckpts = sorted((tmp_path / "out" / "ray" / "ddp").glob("checkpoint_0*"))
    assert [c.name for c in ckpts] == ["checkpoint_00000002", "checkpoint_00000004"]
    gen = load_generator(out.checkpoint)
    batch = gen.sample(2, Conditions(["fabric"] * 2, ["hole", "stain"]), seed=0, options=SamplingOptions(steps=3))
    assert batch.masks.max() <= len(gen.context.classes["fabric"])


def _alive_controllers(wait_s: float = 30.0) -> list:
    """This driver's TrainController actors still ALIVE after up to ``wait_s`` (an actor whose last
    handle went is killed asynchronously)."""
    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    deadline = time.time() + wait_s
    while True:
        alive = [a.actor_id for a in list_actors(filters=[("class_name", "=", "TrainController"),
                                                          ("state", "=", "ALIVE")], raise_on_missing_output=False)
                 if a.job_id == job]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {f"{f.stem}.{k}": v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _registered_step(snapshot: Path) -> int | None:
    """Global step of the latest checkpoint in Train's controller snapshot, None before there is one."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    return latest["metrics"]["global_step"] if latest else None


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(ray_session, synth_root, tmp_path):
    """Kill the training driver after its first checkpoint; the same command resumes from it and
    ends with the weights of an uninterrupted run."""
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    common = ["--data", str(synth_root), "--product", "fabric", "--no-mlflow", "train.steps=24",
              "train.checkpoint_every=4", "train.batch_size=4", "train.scaling.num_workers=1", "train.ema_decay=null",
              "train.log_every=1"]
    cmd = [sys.executable, "-m", "defectforge.cli", "train", "--out", str(tmp_path / "b"), "--name", "r", *common]
    storage = tmp_path / "b" / "ray" / "r"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    # Kill once Train's controller has *registered* a checkpoint (its snapshot lists it): a checkpoint
    # folder alone can appear just before the kill and is then rightly not resumed from.
    snapshot = storage / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while _registered_step(snapshot) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_at_kill = _registered_step(snapshot)
    assert steps_at_kill is not None, "no checkpoint was registered before the kill"
    assert steps_at_kill < 24, "the run finished before it could be killed; raise train.steps"

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resumed from checkpoint" in log
    resumed_at = int(log.split("resumed from checkpoint at stage 'diffusion' step ")[1].split()[0])
    assert resumed_at >= steps_at_kill and resumed_at % 4 == 0
    assert f"step {resumed_at + 1}/24" in log  # continues where the checkpoint left off
    assert "step 1/24" not in log

    straight = subprocess.run([sys.executable, "-m", "defectforge.cli", "train", "--out", str(tmp_path / "a"),
                               "--name", "s", *common], env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = _weights(tmp_path / "a" / "s" / "generator"), _weights(tmp_path / "b" / "r" / "generator")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key



@pytest.mark.slow
def test_cli_per_product_and_multi_product(ray_session, synth_root, tmp_path, capsys):
    """`--products a,b` trains one generator per product (concurrent Ray tasks); with
    `--mode multi-product` one generator conditioned on both products."""
    from defectforge.cli import main

    common = ["--data", str(synth_root), "--products", "fabric,metal", "--no-mlflow", "train.steps=2",
              "train.checkpoint_every=2", "train.batch_size=2"]
    assert main(["train", *common, "--out", str(tmp_path / "pp")]) == 0
    for product in ("fabric", "metal"):
        gen = load_generator(tmp_path / "pp" / f"train-defect-gen-{product}" / "generator")
        assert gen.context.products == (product,)
    assert main(["train", *common, "--mode", "multi-product", "--out", str(tmp_path / "mp")]) == 0
    gen = load_generator(tmp_path / "mp" / "train-defect-gen-fabric+metal" / "generator")
    assert gen.context.products == ("fabric", "metal")
    batch = gen.sample(2, Conditions(["fabric", "metal"], ["hole", "scratch"]), seed=0,
                       options=SamplingOptions(steps=2))
    assert batch.product == ["fabric", "metal"] and batch.images.shape[0] == 2
