"""Ray cluster helpers shared by train/, evaluate/ and sweep/.

Why ``ensure_ray`` may ship the package: under ``ray job submit --working-dir .`` the driver
imports defectforge from the uploaded checkout (``jobs/*.py`` put ``platform/`` on ``sys.path``),
but ``--working-dir`` only puts the checkout's root on the workers' path. When the package is not
installed in the cluster's site-packages, the driver passes it as a ``py_modules`` runtime env, so
Train workers, Tune trials and Ray Data actors import the very code the driver runs.

Why ``outside_placement_group``: a sweep trial runs inside a tiny Tune placement group
(no CPU, a little memory) that captures the tasks it starts. The evaluation's own Ray tasks (diversity
metrics, segmentation runs) need whole CPUs, so they are scheduled on the cluster at large.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from defectforge.errors import ClusterError


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` or the cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), else
    Ray's own default: the head of a ``ray start`` on this machine when there is one, else a new
    local cluster (``RAY_ADDRESS=local`` always starts a private one). A failure to start or join
    is a ``ClusterError`` naming the address tried and how to choose another."""
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict | None = None
    if under_ray_job() and not package_installed():
        package = package_dir()
        print(f"[cluster] defectforge is not installed on the cluster: shipping {package} to the workers "
              "(runtime_env py_modules)", flush=True)
        runtime_env = {"py_modules": [str(package)]}
    plugins = plugin_runtime_env()
    if plugins:
        runtime_env = {**(runtime_env or {}), "env_vars": plugins}
    # Ray Train gives a worker group 60 s to start; on a busy 2-CPU machine (two sweep trials
    # importing torch at once while an evaluation runs) that failed a trial measured here. A local
    # cluster started below inherits this environment; a remote one keeps its own setting.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    os.environ.setdefault(IDLE_WORKERS_ENV, str(idle_worker_limit()))  # a local cluster keeps warm workers
    target = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=target, log_to_driver=True, runtime_env=runtime_env)
    except Exception as e:  # re-raised below with what to do about it
        # With no address Ray joins the head of a `ray start` on this machine when there is one
        # (its address file), else starts a local cluster; joining someone else's head (token
        # auth, another version) fails deep inside Ray with no hint that it was not ours.
        where = (f"{target!r}, from {'the caller' if address else 'RAY_ADDRESS'}" if target else
                 "none given: Ray joins a head started with `ray start` on this machine, else starts one")
        raise ClusterError(f"could not start or join a Ray cluster (address: {where}): {type(e).__name__}: {e}. "
                           "Set RAY_ADDRESS=local to start a private local cluster, or RAY_ADDRESS=<host:port> "
                           "to join another.") from e


IDLE_WORKERS_ENV = "RAY_num_workers_soft_limit"  # Ray's own setting, read from the env by every Ray process


def idle_worker_limit(num_cpus: int | None = None) -> int:
    """How many idle worker processes a node should keep alive: 2 x its CPUs + 4 (8 on 2 CPUs).

    Why: Ray keeps as many idle workers as the node has *available* CPUs and kills the rest after
    a second (ray-project/ray#36766; the churn of #27863). In a sweep a trial's training holds a
    CPU and zero-CPU processes (the trial, its ``evaluate`` task) hold workers, so on 2 CPUs the
    evaluation's map-task workers, which cache torch, diffusers and the models
    (``evaluate.actors.eval_block``), were killed between trials and every trial's evaluation
    started cold. Measured here (2026-12-01, 3-trial tiny sweep, one product): the 2nd and 3rd
    trials' evaluation passes took 8.3 s and 8.5 s with Ray's default, 9.6 s and 1.1 s with a
    limit of 4, 1.7 s and 1.7 s with 8. Idle workers cost memory only (~0.2-1 GB each once torch
    is imported), and only as many exist as were ever busy at once.
    Set for a local cluster by ``ensure_ray``, for cluster nodes in ``cluster.yaml``; an explicit
    ``RAY_num_workers_soft_limit`` in the environment wins."""
    return 2 * (num_cpus or os.cpu_count() or 1) + 4


def plugin_runtime_env() -> dict[str, str]:
    """Env vars that let Ray workers import the methods in ``DEFECTFORGE_PLUGINS`` folders: the
    variable itself (their registries discover the same methods) and the folders on
    ``PYTHONPATH`` (objects of a plugin's classes unpickle there). Empty without plugins."""
    from defectforge.methods.registry import PLUGINS_ENV, plugin_dirs

    dirs = [str(d) for d in plugin_dirs()]  # resolved: a worker's working directory differs
    if not dirs:
        return {}
    # After the existing entries, as the driver's registry appends them to sys.path: a plugin
    # never shadows an installed module in one process and not in another.
    path = os.pathsep.join([*[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p], *dirs])
    env = {PLUGINS_ENV: os.pathsep.join(dirs), "PYTHONPATH": path}
    # Under ``ray job submit --runtime-env-json '{"env_vars": ...}'`` Ray refuses a driver's
    # runtime_env that sets a key the job's already sets: the job's values win there.
    job_env = _job_env_vars()
    return {k: v for k, v in env.items() if k not in job_env}


def _job_env_vars() -> dict[str, str]:
    """``env_vars`` of the Ray job's runtime_env when this driver runs under ``ray job submit``."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


STORAGE_ENV = "DEFECTFORGE_STORAGE_PATH"
SHARED_FS_ENV = "DEFECTFORGE_SHARED_FS"


def storage_for(root: str, owner: Path, kind: str) -> str:
    """``<root>/<kind>/<owner name>-<hash of its path>``: the storage of one run root (``owner``)
    under a storage root shared by every job of a cluster. Why per owner: Ray Train resumes a run
    from ``<storage>/<run name>`` and run names are fixed per method and product, so two
    ``--out`` folders sharing one storage folder would resume (or ``--overwrite`` would delete)
    each other's checkpoints."""
    import hashlib

    owner = Path(owner).resolve()
    tag = hashlib.sha1(str(owner).encode()).hexdigest()[:8]
    return str(Path(root).expanduser().resolve() / kind / f"{owner.name}-{tag}")


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_storage_path(storage: str, flag: str) -> None:
    """Storage must be a filesystem path (checked before Ray starts).

    Why no ``s3://`` yet: besides Ray's checkpoints, the storage holds the train-once registry's
    markers, per-trial checkpoints that hard-link the shared weights, resume records and the
    evaluations, all written with POSIX file operations. On a cluster the path is a shared mount
    (AWS EFS, GCP Filestore, any NFS) at the same place on every node (cluster.yaml mounts one).
    """
    from defectforge.errors import ConfigError

    if "://" in storage:
        raise ConfigError(
            f"{flag}: {storage} is a URI; defectforge's storage must be a filesystem path (its train-once "
            "registry and per-trial checkpoints use hard links and atomic renames). On a cluster, mount shared "
            f"storage (AWS EFS, GCP Filestore, NFS) at the same path on every node, point {flag} (or env "
            f"{STORAGE_ENV}) at it and name the mount in {SHARED_FS_ENV} (cluster.yaml does both)")


def shared_mounts() -> list[Path]:
    """The folders ``DEFECTFORGE_SHARED_FS`` names (``os.pathsep``-separated) as mounted at the
    same path on every node of the cluster."""
    return [Path(p).expanduser().resolve() for p in os.environ.get(SHARED_FS_ENV, "").split(os.pathsep) if p.strip()]


def check_shared_storage(storage: str, flag: str) -> None:
    """Refuse storage outside a shared mount on a multi-node cluster, at once and saying what to set.

    Ray Train writes checkpoints from the worker's node and Tune restores from the driver's; a
    local folder is a different folder on every node, and Ray's own check fails late (after the
    first checkpoint) and cryptically. On more than one node the storage must lie under a folder
    named in ``DEFECTFORGE_SHARED_FS`` (cluster.yaml: ``/mnt/shared``, the EFS mount), so a stray
    ``sweep.storage_path=/home/ubuntu/x`` is still refused there. Call after ``ensure_ray``; one
    node (a laptop) always passes.
    """
    from defectforge.errors import ConfigError

    path = Path(storage).expanduser().resolve()
    if any(path == m or m in path.parents for m in shared_mounts()):
        return
    n = alive_nodes()
    if n > 1:
        mounts = ", ".join(str(m) for m in shared_mounts()) or "none"
        raise ConfigError(
            f"{flag}: {storage} is not on a shared mount (DEFECTFORGE_SHARED_FS: {mounts}), but the cluster has "
            f"{n} nodes and Train/Tune write checkpoints from every node. Mount shared storage (AWS EFS, GCP "
            f"Filestore, NFS) at the same path on every node, name it in {SHARED_FS_ENV} and point {flag} "
            f"(or env {STORAGE_ENV}) under it")


def under_ray_job() -> bool:
    """True in a driver started by the Ray Jobs API (``ray job submit``), which injects its job config."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # the name ray.init itself looks for


def package_dir() -> Path:
    import defectforge

    return Path(defectforge.__file__).resolve().parent


def package_installed() -> bool:
    """True when defectforge was imported from a site-packages (a regular, non-editable install)."""
    return any(part in ("site-packages", "dist-packages") for part in package_dir().parts)


def outside_placement_group():
    """Scheduling strategy that keeps a task out of any enclosing (captured) placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)


def check_gpus_available(requested: float, field: str) -> None:
    """Refuse a GPU request no GPU can satisfy, before anything heavy starts.

    Why: Ray queues a task that asks for a GPU until one appears, so on a machine without one the
    command would hang instead of failing. Checked against the connected cluster's resources, or,
    with no cluster yet and none configured (``RAY_ADDRESS`` unset, so a local one will be
    started), against this machine's CUDA devices. A cluster named by ``RAY_ADDRESS`` but not yet
    connected is not second-guessed: its workers may have GPUs the driver lacks.
    """
    if not requested:
        return
    import ray

    from defectforge.errors import DeviceError

    if ray.is_initialized():
        gpus = float(ray.cluster_resources().get("GPU", 0))
        where = "the connected Ray cluster"
    elif os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        return
    else:
        import torch

        gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
        where = "this machine (no RAY_ADDRESS cluster configured)"
    if gpus <= 0:
        raise DeviceError(f"{field} asks for a GPU but {where} has none; Ray would wait for one forever. "
                          f"Set {field} to false/0 or run on a cluster with GPUs")


def resolve_device(name: str, flag: str = "--device") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; an explicit device must exist on this machine.

    Checked before a checkpoint is loaded, so ``--device cuda`` without a GPU is one clear line and
    not a CUDA traceback from deep inside torch.
    """
    import torch

    from defectforge.errors import DeviceError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"{flag} {name!r}: not a device name ({exc}); use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{flag} {name}: CUDA is not available on this machine (no GPU visible to torch "
                              f"{torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "cuda"):
        raise DeviceError(f"{flag} {name}: only cpu and cuda devices are supported")
    return name


def remove_leaked_placement_groups(log=print, limit: int = 10_000) -> int:
    """Remove placement groups that a dead job left behind with nothing running in them.

    Why: when a sweep driver is killed (SIGKILL, a crashed head process, a lost laptop running
    ``ray job submit``), Ray Train's worker-group placement groups of the trainings it was running
    can stay CREATED with their CPUs reserved (seen on Ray 2.x here: its PlacementGroupCleaner
    actor outlived the job but did not remove them). The restored sweep then waits for CPUs for
    ever, silently. A placement group is removed only when (a) the job that created it (the last 4
    bytes of its id) is dead and (b) no live actor runs in it, so a live detached service (e.g.
    Ray Serve replicas a finished job deployed) keeps its resources. Returns how many were removed;
    each is logged. Best effort: without the state API (no dashboard) it removes nothing and says so.
    """
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    try:
        from ray.util.state import list_actors

        dead_jobs = {j["JobID"] for j in ray.state.jobs() if j.get("IsDead")}
        # Ray 2.60's state API refuses limits above 10 000 (the default limit used to be 100 000, so
        # this cleanup never ran, and a restored sweep waited for a killed driver's CPUs in CI).
        in_use = {a.placement_group_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=limit)
                  if a.placement_group_id}
        table = placement_group_table()
    except Exception as exc:  # the state API needs the dashboard; never fail a sweep over a cleanup
        log(f"[cluster] could not check for placement groups left by dead jobs ({type(exc).__name__}: {exc})")
        return 0
    removed = 0
    for pg_id, pg in table.items():
        if pg.get("state") in ("CREATED", "PENDING", "RESCHEDULING") and pg_id[-8:] in dead_jobs \
                and pg_id not in in_use:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
            removed += 1
            log(f"[cluster] removed placement group {pg_id} ({pg.get('bundles')}) left by dead job {pg_id[-8:]} "
                "with nothing running in it (a killed driver's training)")
    return removed


@contextmanager
def removing_leaked_placement_groups(log=print, every_s: float = 15.0) -> Iterator[None]:
    """``remove_leaked_placement_groups`` now and then every ``every_s`` seconds in a background
    thread, for as long as the block runs (a sweep).

    Why not only once at the start: a killed driver's Ray Train controller can outlive it by
    seconds and reserve its placement group after the restored sweep's start-up cleanup has run
    (its actors were still alive then, so it was rightly kept). Once they die, nothing else frees
    those CPUs (seen in CI: the next job on the cluster waited for that CPU for ever; the likely
    cause of a later CI timeout of the three-kill sweep test, whose restored run never finished).
    Only dead jobs' groups with nothing running in them are removed, so calling it while trials
    run is safe. A failing cleanup is logged, never raised."""
    stop = threading.Event()

    def cleanup() -> None:  # a cleanup never ends a sweep, nor hides the error that is ending it
        try:
            remove_leaked_placement_groups(log)
        except Exception as exc:  # noqa: BLE001 (e.g. a group removed by Ray between listing and removing)
            log(f"[cluster] placement-group cleanup failed ({type(exc).__name__}: {exc})")

    def sweep_loop() -> None:
        while not stop.wait(every_s):
            cleanup()

    cleanup()
    thread = threading.Thread(target=sweep_loop, name="defectforge-pg-cleanup", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
        cleanup()
