"""Shared fixtures: one synthetic dataset and one Ray cluster per test session.

Why session-scoped: generating data and starting Ray cost seconds; DESIGN.md also warns that two
local Ray clusters on one machine confuse Train V2's cleanup.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ray.train.report blocks ~2 s per call at the default health-check interval (DESIGN.md).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_MT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The built-in synthetic dataset (2 products, 64 px), generated once per session."""
    from defectforge.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(out, seed=0, size=64, products=2)
    return out


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    """The real magnetic-tile dataset from ../shared, or a clean skip when it is not there."""
    if not (SHARED_MT / "metadata.csv").is_file():
        pytest.skip(f"magnetic-tile dataset not found at {SHARED_MT}")
    return SHARED_MT


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (num_cpus=2)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    yield ray
    ray.shutdown()
