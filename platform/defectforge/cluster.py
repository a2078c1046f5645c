"""Ray cluster helpers shared by train/, evaluate/ and sweep/.

Why ``outside_placement_group``: a sweep trial runs inside a tiny Tune placement group
(``{"cpu": 0.01}``) that captures the tasks it starts. The evaluation's own Ray tasks (diversity
metrics, segmentation runs) need whole CPUs, so they are scheduled on the cluster at large.
"""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``) or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def outside_placement_group():
    """Scheduling strategy that keeps a task out of any enclosing (captured) placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)
