"""Shared fixtures: one synthetic dataset and one Ray cluster per test session.

Why session-scoped: generating data and starting Ray cost seconds; DESIGN.md also warns that two
local Ray clusters on one machine confuse Train V2's cleanup.

Why the cluster is a head started with ``ray start --head`` rather than ``ray.init()``: the tests
submit a Ray job to it (``ray job submit`` needs a running head with its dashboard), and subprocess
tests (killed drivers, CLI runs) join the same cluster through ``RAY_ADDRESS``.

Why the token is set here: a new local head enables token auth (DESIGN.md: keep it on), and a
client only sends the token if ``RAY_AUTH_MODE=token`` is in its environment *before* ray is
imported. A session token in ``RAY_AUTH_TOKEN`` keeps the tests away from ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before anything imports ray (its auth mode is read once, at import).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# ray.train.report blocks ~2 s per call at the default health-check interval (DESIGN.md).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_MT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread for the test (then the previous count again): on this shared 2-CPU box
    OpenMP spin-waiting with 2 threads makes small convolutions ~5x slower, other test processes
    share the cores, and Ray tasks run with one thread per CPU anyway. Modules that want it say
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@dataclass(frozen=True)
class RayHead:
    gcs_address: str  # for ray.init / RAY_ADDRESS
    dashboard: str  # for ray job submit --address


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A local head (2 CPUs, dashboard on) started with ``ray start --head --block``, stopped at the end.

    The venv's bin directory goes first on the head's PATH so that a job entrypoint ``python ...``
    runs this interpreter. ``RAY_ADDRESS`` is exported so every subprocess joins this cluster.
    """
    bin_dir = Path(sys.executable).parent
    port, dash = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    from defectforge.cluster import IDLE_WORKERS_ENV, idle_worker_limit

    cpus = 2
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           IDLE_WORKERS_ENV: os.environ.get(IDLE_WORKERS_ENV, str(idle_worker_limit(cpus)))}  # as cluster.yaml's
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=true",
           "--disable-usage-stats"]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    gcs = None
    deadline = time.time() + 120
    while gcs is None and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        for line in log.read_text().splitlines():  # "ray start --address='<ip>:<port>'" once it is up
            if "ray start --address=" in line and f":{port}" in line:
                gcs = line.split("--address=")[1].split("'")[1]
        time.sleep(0.2)
    if gcs is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the Ray head did not come up in 120 s:\n{log.read_text()[-3000:]}")
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = gcs
    yield RayHead(gcs_address=gcs, dashboard=f"http://127.0.0.1:{dash}")
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous
    # --block: SIGTERM stops every Ray process of the head (~4 s when idle); Ray's graceful drain can
    # take 30 s with workers about, and nothing of this throw-away cluster needs saving.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    from ray._common.utils import get_ray_address_file  # the head leaves its address behind

    address_file = Path(get_ray_address_file(None))
    if address_file.is_file() and address_file.read_text().strip() == gcs:
        address_file.unlink()


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This process connected to the session's head (``ray_head``) for the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.gcs_address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    yield ray
    ray.shutdown()


# --------------------------------------------------------------- a tiny Stable-Diffusion folder
def _tiny_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    vocab = ["a</w>", "p", "h", "ph", "o", "t", "f", "photo</w>", "of</w>", "fabric</w>", "<unk>", "<|startoftext|>",
             "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\np h\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=40)
    tok.save_pretrained(folder)
    return len(vocab)


@pytest.fixture()
def sd_folder(tmp_path):
    """A Stable-Diffusion-1.x layout from tiny random diffusers / transformers models."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    root = tmp_path / "sd"
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8
                         ).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(root / "vae")
    n_vocab = _tiny_clip_tokenizer(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=n_vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=40)
                  ).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(autouse=True)
def _no_leaked_placement_groups(request):
    """After each test on the session's cluster, remove placement groups left CREATED by dead jobs
    with nothing running in them (``cluster.remove_leaked_placement_groups``). Why: a test that
    kills a sweep driver can leave a Train placement group holding a CPU (seen: a DDP test then
    waited for 2 CPUs until CI was stopped); the dead job's detached PlacementGroupCleaner did not
    remove it. Best effort: never fails a test."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    try:
        from defectforge.cluster import remove_leaked_placement_groups

        remove_leaked_placement_groups(log=lambda msg: print(msg, flush=True))
    except Exception as exc:  # a cleanup must never fail the test it follows
        print(f"[conftest] placement-group cleanup skipped: {type(exc).__name__}: {exc}", flush=True)


# ------------------------------------------------- laptop backbones pretrained once (quality tests)
@dataclass(frozen=True)
class PretrainedBackbone:
    cfg: object  # the ConfigBase it was trained with
    checkpoint: Path  # generator folder (holds the ``backbone`` module)
    data: Path


@pytest.fixture(scope="session")
def synth128_root(tmp_path_factory) -> Path:
    """The built-in dataset as the laptop presets use it: `data synth`'s defaults (2 products drawn
    at 128 px, loaded at the preset's 64 px; drawn at 64 px a scratch is one pixel wide)."""
    from defectforge.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth128") / "data", seed=0, size=128, products=2)


def _pretrain(method: str, products: list[str], root: Path, out: Path, extra: list[str]) -> PretrainedBackbone:
    """Stage ``backbone`` alone (``train.stages=[backbone]``) at the method's laptop preset, through
    the real training path."""
    from defectforge.config import resolve_config
    from defectforge.train.runner import train

    cfg = resolve_config(method=method, preset="laptop", overrides=[
        f"data.path={root}", f"data.products=[{','.join(products)}]", f"tracking.run_root={out}",
        "train.stages=[backbone]", *extra])
    [outcome] = train(cfg, out / "runs", log_to_mlflow=False)
    assert outcome.ok, outcome.error
    return PretrainedBackbone(cfg=cfg, checkpoint=Path(outcome.checkpoint), data=root)


@pytest.fixture(scope="session")
def laptop_unet_backbone(ray_session, synth128_root, tmp_path_factory) -> PretrainedBackbone:
    """The laptop ``unet`` backbone (AnomalyDiffusion's and DefectSynth's), pretrained on fabric."""
    return _pretrain("anomaly-diffusion", ["fabric"], synth128_root, tmp_path_factory.mktemp("bb-unet"), [])


@pytest.fixture(scope="session")
def laptop_dit_backbone(ray_session, synth128_root, tmp_path_factory) -> PretrainedBackbone:
    """The laptop ``dit`` backbone (DefectDiffu's), pretrained on both products at once."""
    return _pretrain("defect-diffu", ["fabric", "metal"], synth128_root, tmp_path_factory.mktemp("bb-dit"),
                     ["train.mode=multi-product"])
