"""Train once, sweep many (train/reuse.py): which config changes retrain, and one training per key
even when trials ask at the same time."""

from __future__ import annotations

import threading
import time

import pytest

from defectforge.config import resolve_config
from defectforge.train import reuse


def _cfg(*overrides: str):
    return resolve_config("defect-gen", "laptop", None, list(overrides))


def test_sampling_time_fields_do_not_change_the_key_and_training_fields_do():
    base = reuse.training_key(_cfg())
    # u inside the trained range, the sampler, the evaluation and the sweep are sampling-time.
    assert reuse.training_key(_cfg("method.u=300")) == base
    assert reuse.training_key(_cfg("sampling.steps=40", "sampling.sampler=ddpm")) == base
    assert reuse.training_key(_cfg("evaluation.n_per_defect=3", "sweep.num_trials=9")) == base
    assert reuse.training_key(_cfg("train.log_every=7", "train.checkpoint_every=11")) == base
    # Anything that shapes the weights is a new key.
    for change in ("method.receptive_field=medium", "train.lr=3e-4", "train.steps=10", "data.split.seed=3",
                   "method.u_range=[50,600]", "data.products=[fabric]", "train.seed=1"):
        assert reuse.training_key(_cfg(change)) != base, change
    assert "u" in reuse.sampling_time_fields(type(_cfg().method))
    assert "receptive_field" not in reuse.sampling_time_fields(type(_cfg().method))


def test_run_name_is_deterministic():
    assert reuse.run_name("s", _cfg("method.u=120")) == reuse.run_name("s", _cfg("method.u=400"))
    assert reuse.run_name("s", _cfg()).startswith("s-gen-")


def test_two_trials_asking_at_once_train_once(ray_session, tmp_path):
    registry = reuse.registry_handle(f"test-{time.time_ns()}")
    calls = []

    def train():
        calls.append(threading.get_ident())
        time.sleep(1.5)
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir(exist_ok=True)
        return {"checkpoint": str(ckpt), "loss": 0.5}

    results = {}

    def trial(holder):
        results[holder] = reuse.train_once(registry, "k1", holder, tmp_path / "run", train, poll_s=0.1,
                                           log=lambda *_: None)

    threads = [threading.Thread(target=trial, args=(h,)) for h in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1
    assert sorted(trained for _, trained in results.values()) == [False, False, True]
    records = [r for r, _ in results.values()]
    assert all(r["checkpoint"] == str(tmp_path / "ckpt") and r["key"] == "k1" for r in records)
    # Later (e.g. a restored sweep on a new cluster): the marker alone says it is done.
    again, trained = reuse.train_once(reuse.registry_handle(f"other-{time.time_ns()}"), "k1", "d",
                                      tmp_path / "run", train, log=lambda *_: None)
    assert not trained and len(calls) == 1 and again["trained_by"] in ("a", "b", "c")


def test_a_failed_training_releases_the_key(ray_session, tmp_path):
    registry = reuse.registry_handle(f"test-fail-{time.time_ns()}")

    def boom():
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        reuse.train_once(registry, "k2", "a", tmp_path / "run", boom, log=lambda *_: None)
    record, trained = reuse.train_once(registry, "k2", "b", tmp_path / "run",
                                       lambda: {"checkpoint": str(tmp_path)}, log=lambda *_: None)
    assert trained and record["trained_by"] == "b"
