"""Train once, sweep many: a trained generator is reused by every trial that would train it again.

Why: most of a sweep's parameters are *sampling-time* choices (Defect-Gen's switch timestep ``u``
inside its trained range, the sampler and its number of steps). Two trials that differ only in
those would train bit-for-bit the same weights; training is the expensive part of a trial on a
CPU. So a trial names its training by a hash of the config fields that shape the weights
(:func:`training_key`) and trains only if no earlier trial did.

What counts as training-relevant (anything else may differ between trials that share weights):

* ``data`` (the dataset path, products, resolution, split protocol and seed, ...), which fixes the
  training rows;
* ``method``, except the fields a method marks ``json_schema_extra={"sampling_time": True}``;
* ``train``, except bookkeeping that does not change the weights (``log_every``,
  ``checkpoint_every``, ``num_to_keep``, ``max_failures``).

``sampling``, ``evaluation``, ``tracking`` and ``sweep`` never shape the weights. The rule is
method-agnostic: a new method only marks its sampling-time fields.

Concurrency (two trials asking for the same key at once, on one machine or a cluster): a named,
detached Ray actor (:class:`TrainOnceRegistry`, one per sweep) hands the key to one trial; the
others wait until that trial has written the *done marker* (``TRAINED.json`` beside the Train
run's folder), then reuse its checkpoint. A claim whose holder stops sending heartbeats (a
killed trial that Tune does not restart) lapses, so no trial waits forever. The marker lives on
the sweep's storage, so a restored sweep (even on a new Ray cluster) trains none twice.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from defectforge.config import ConfigBase
from defectforge.methods.base import sampling_time_fields  # noqa: F401 (re-exported; defined with the protocol)

BOOKKEEPING_TRAIN_FIELDS = frozenset({"log_every", "checkpoint_every", "num_to_keep", "max_failures"})
DONE_MARKER = "TRAINED.json"
HEARTBEAT_S = 5.0
LEASE_S = 60.0  # a claim without a heartbeat for this long is abandoned


def training_fields(cfg: ConfigBase, method_fields: list[str] | None = None) -> dict[str, Any]:
    """The part of ``cfg`` that determines the trained weights (see the module docstring).

    ``method_fields``: only these method fields (and the name) count, for a run that trains one
    stage depending on them alone (a pretraining, ``MethodConfigBase.pretraining``)."""
    full = cfg.to_dict()
    method = {k: v for k, v in full["method"].items() if k not in sampling_time_fields(type(cfg.method))
              and (method_fields is None or k in method_fields or k == "name")}
    train = {k: v for k, v in full["train"].items() if k not in BOOKKEEPING_TRAIN_FIELDS}
    return {"data": full["data"], "method": method, "train": train}


def training_key(cfg: ConfigBase, method_fields: list[str] | None = None) -> str:
    """sha256 (hex) of :func:`training_fields` as canonical JSON: equal keys, equal weights."""
    blob = json.dumps(training_fields(cfg, method_fields), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_name(prefix: str, cfg: ConfigBase) -> str:
    """A deterministic Train run name for this training: ``<prefix>-gen-<first 12 hex of the key>``."""
    return f"{prefix}-gen-{training_key(cfg)[:12]}"


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """The done marker of a finished training (its checkpoint path and final metrics), or None."""
    path = Path(run_dir) / DONE_MARKER
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not Path(record["checkpoint"]).is_dir():
        return None  # the checkpoint it names is gone: train again rather than fail later
    return record


def write_done(run_dir: Path, record: dict[str, Any]) -> None:
    """Write the done marker atomically (a reader never sees half a file)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{DONE_MARKER}.partial"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(run_dir / DONE_MARKER)


class TrainOnceRegistry:
    """Who is training which key right now (a Ray actor; see the module docstring)."""

    def __init__(self) -> None:
        self.claims: dict[str, tuple[str, float]] = {}  # key -> (holder, last heartbeat)

    def claim(self, key: str, holder: str) -> str | None:
        """Take ``key`` for ``holder`` (returns None) or name the live holder that has it."""
        now = time.time()
        current = self.claims.get(key)
        if current is None or current[0] == holder or now - current[1] > LEASE_S:
            self.claims[key] = (holder, now)
            return None
        return current[0]

    def heartbeat(self, key: str, holder: str) -> None:
        if self.claims.get(key, (None,))[0] == holder:
            self.claims[key] = (holder, time.time())

    def release(self, key: str, holder: str) -> None:
        if self.claims.get(key, (None,))[0] == holder:
            del self.claims[key]


def registry_handle(name: str) -> Any:
    """The sweep's registry actor, created on first use (``get_if_exists`` makes that atomic)."""
    import ray

    from defectforge.cluster import outside_placement_group

    cls = ray.remote(num_cpus=0, max_restarts=0)(TrainOnceRegistry)
    # Outside the caller's placement group: a sweep trial's group (and every actor it captured)
    # is removed when that trial ends, while the registry must outlive it.
    return cls.options(name=f"train-once-{name}", namespace="defectforge", lifetime="detached",
                       get_if_exists=True, scheduling_strategy=outside_placement_group()).remote()


def drop_registry(name: str) -> None:
    """Remove a sweep's registry actor (at the end of the sweep); a missing one is fine."""
    import ray

    try:
        ray.kill(ray.get_actor(f"train-once-{name}", namespace="defectforge"))
    except ValueError:
        pass


def train_once(registry: Any, key: str, holder: str, run_dir: Path, train: Any,
               poll_s: float = 2.0, log: Any = print) -> tuple[dict[str, Any], bool]:
    """The done record for ``key``: reused if some trial trained it, else ``train()``-ed here.

    ``train()`` returns the record to store (at least ``checkpoint``); it runs while this holder
    keeps the claim alive with heartbeats. Returns ``(record, trained_here)``. If ``train()``
    raises, the claim is released so a waiting trial may try, and the error propagates.
    """
    import ray

    waited = False
    while True:
        done = read_done(run_dir)
        if done is not None:
            if waited:
                log(f"[train-once] {holder}: reusing {run_dir.name}, trained by {done.get('trained_by')}")
            return done, False
        other = ray.get(registry.claim.remote(key, holder))
        if other is None:
            break
        if not waited:
            log(f"[train-once] {holder}: waiting for {other}, which is training the same config ({run_dir.name})")
            waited = True
        time.sleep(poll_s)

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            registry.heartbeat.remote(key, holder)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        done = read_done(run_dir)  # finished between our last look and the claim
        if done is not None:
            return done, False
        record = dict(train())
        record.setdefault("trained_by", holder)
        record["key"] = key
        write_done(run_dir, record)
        return record, True
    finally:
        stop.set()
        thread.join(timeout=1)
        ray.get(registry.release.remote(key, holder))
