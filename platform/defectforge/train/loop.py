"""The one ``train_loop_per_worker`` every method trains with (Ray Train V2).

Why one loop: the method supplies stages, modules and losses through the protocol in
``methods/base.py``; everything about *how* to train is here, once: DDP via ``prepare_model``,
per-worker data shards, mixed precision on GPU, gradient clipping, EMA, NaN checks, progress
output, MLflow metrics from rank 0, checkpoints every ``train.checkpoint_every`` steps and resume
from ``ray.train.get_checkpoint()``.

Checkpoint directory (one per report, rank 0 writes it)::

    generator/        save_pretrained(): EMA weights, config.json -> loadable without this code
    train_state.pt    raw weights, optimizer, EMA, stage and step -> exact resume
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train
import ray.train.torch
import torch

if TYPE_CHECKING:  # imported where EMA is built: see _ema
    from diffusers.training_utils import EMAModel

from defectforge.config import config_from_dict
from defectforge.errors import ConfigError
from defectforge.methods.base import (
    Generator,
    GeneratorContext,
    SamplingOptions,
    Stage,
    build_generator,
    read_checkpoint_meta,
    select_stages,
)
from defectforge.train.data import StepBatches, rows_to_tensors

GENERATOR_DIR = "generator"
STATE_FILE = "train_state.pt"


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss became NaN or infinite."""


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """sha256 of the training rows' names (product/defect/id/split, sorted): the split a checkpoint
    was trained on, comparable with the run's ``split_manifest.json`` without the pixels."""
    import hashlib

    names = sorted(f"{r['product']}/{r['defect']}/{r['id']}/{r.get('split', '')}" for r in rows)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _seed_for(seed: int, rank: int, global_step: int) -> int:
    # Torch RNG (noise, timesteps) reseeded per step: resume reproduces the uninterrupted run.
    return (seed * 1_000_003 + rank * 7_919 + global_step) % (2**63 - 1)


def _stage_params(gen: Generator, modules: tuple[str, ...]) -> list[torch.nn.Parameter]:
    trainable = gen.trainable_modules()
    unknown = [m for m in modules if m not in trainable]
    if unknown:
        raise KeyError(f"stage names modules {unknown} that trainable_modules() does not have")
    return [p for m in modules for p in trainable[m].parameters()]


def stage_optimizer(gen: Generator, stage: Stage, params: list[torch.nn.Parameter], tc: Any) -> torch.optim.Optimizer:
    """The method's optimiser for ``stage`` (``Generator.configure_optimizer``) at the stage's own
    rate and decay, None = ``train.lr`` / ``train.weight_decay`` (``tc``: the ``train`` config).
    One place, so what ``jobs/benchmark.py train`` times is what training builds."""
    return gen.configure_optimizer(
        dataclasses.replace(stage, lr=stage.lr if stage.lr is not None else tc.lr,
                            weight_decay=stage.weight_decay if stage.weight_decay is not None else tc.weight_decay),
        params)


def _set_trainable(gen: Generator, modules: tuple[str, ...]) -> None:
    for p in gen.parameters():
        p.requires_grad_(False)
    for p in _stage_params(gen, modules):
        p.requires_grad_(True)


def _ema(params: list[torch.nn.Parameter], decay: float) -> EMAModel:
    """diffusers' EMA of ``params``, imported here and not at module level: a sweep trial's actor
    imports this module (through ``train.runner``) only to launch the Train run, and
    ``diffusers.training_utils`` pulls in most of diffusers and transformers (measured here:
    ``import defectforge.train.loop`` 21 s -> 12.5 s of wall time with it deferred). The Train
    worker, which builds the EMA, imports diffusers for the method anyway."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)


def _save(directory: Path, gen: Generator, ema: EMAModel | None, params: list[torch.nn.Parameter],
          state: dict[str, Any]) -> None:
    raw = {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
           for name, m in gen.saved_modules().items()}
    torch.save({**state, "modules": raw}, directory / STATE_FILE)
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        gen.save_pretrained(directory / GENERATOR_DIR)
    finally:
        if ema is not None:
            ema.restore(params)


def _latest_local(root: Path | None) -> ray.train.Checkpoint | None:
    found = sorted(root.glob("checkpoint_*")) if root and root.is_dir() else []
    found = [d for d in found if (d / STATE_FILE).is_file() and (d / GENERATOR_DIR).is_dir()]
    return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None


def _report(metrics: dict[str, Any], rank: int, local_root: Path | None, global_step: int, num_to_keep: int,
            write: Any) -> None:
    """Every rank reports; rank 0 attaches a checkpoint written by ``write(directory)``."""
    name = f"checkpoint_{global_step:08d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
    elif local_root is None:
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    else:
        final, staging = local_root / name, local_root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # a crash mid-write never leaves a half checkpoint to resume from
        for old in sorted(local_root.glob("checkpoint_*"))[:-num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker (or in-process with ``num_workers=0``).

    ``loop_config``: ``config`` (the validated config as a dict), ``context`` (GeneratorContext
    JSON), ``rows`` (training sample rows), optional ``mlflow`` = {"uri", "run_id"}.
    """
    cfg = config_from_dict(loop_config["config"])
    context = GeneratorContext.from_json(loop_config["context"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    label = loop_config.get("label", "train")

    rows = loop_config["rows"][rank::world]  # this worker's shard
    tensors = rows_to_tensors(rows, context)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    gen = build_generator(cfg.method, context).to(device)
    gen.default_sampling = SamplingOptions.from_config(cfg)  # recorded in every checkpoint it saves
    gen.provenance = {  # and where the weights came from (config.json "provenance")
        "method": cfg.method.name, "config": loop_config["config"],
        "training_rows_sha256": rows_digest(loop_config["rows"]), "run_name": label,
        "mlflow_run_id": (loop_config.get("mlflow") or {}).get("run_id")}
    gen.prepare_from_data(loop_config["rows"])  # every row on every rank: model-free methods need all
    stages = select_stages(gen, tc.stages, tc.init_from, tc.init_modules)  # the rest from train.init_from
    stage_steps = [s.steps or tc.steps for s in stages]

    start_stage, start_step, global_step, resume_state = 0, 0, 0, None
    # In-process runs (num_workers=0, Ray Train's local mode) get no checkpoint storage from Ray:
    # the loop keeps their checkpoints under ``local_checkpoint_root`` itself and resumes from there.
    local_root = Path(loop_config["local_checkpoint_root"]) if loop_config.get("local_checkpoint_root") else None
    checkpoint = ray.train.get_checkpoint() or _latest_local(local_root)
    if checkpoint is None and tc.init_from is not None:
        # A fresh run starts from the checkpoint's modules (a resumed one has them in its state).
        init_meta = read_checkpoint_meta(tc.init_from)
        names = list(init_meta["modules"]) if tc.init_modules is None else list(tc.init_modules)
        absent = [n for n in names if n not in init_meta["modules"]]
        if absent:
            raise ConfigError(f"train.init_modules: {tc.init_from} has no module {absent[0]!r}; it saved "
                              f"{', '.join(init_meta['modules']) or 'none'}")
        gen.load_modules(tc.init_from, init_meta["sha256"], names=names)
        if rank == 0:
            print(f"[{label}] initialised {', '.join(names)} from {tc.init_from}", flush=True)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        for name, module in gen.saved_modules().items():
            module.load_state_dict(resume_state["modules"][name], strict=True)
        start_stage, start_step = resume_state["stage_index"], resume_state["stage_step"]
        global_step = resume_state["global_step"]
        if start_stage >= len(stages) and stages:
            # The latest checkpoint is the final one (the driver died after training, e.g. a sweep
            # trial killed during its evaluation): nothing is left to train and that checkpoint is
            # the run's result. Its metrics are reported again so the run's result carries them
            # (Ray mode keeps the restored checkpoint; local mode needs it reported).
            if rank == 0:
                print(f"[{label}] already trained: the latest checkpoint is final (global step {global_step})",
                      flush=True)
            final = resume_state.get("metrics") or {"global_step": global_step}
            ray.train.report(final, checkpoint=checkpoint if rank == 0 and local_root is not None else None)
        elif rank == 0:
            print(f"[{label}] resumed from checkpoint at stage {stages[start_stage].name!r} "
                  f"step {start_step} (global step {global_step})", flush=True)

    mlflow_client = None
    if rank == 0 and loop_config.get("mlflow"):
        import mlflow

        mlflow_client = mlflow.MlflowClient(loop_config["mlflow"]["uri"])
        mlflow_run = loop_config["mlflow"]["run_id"]

    use_amp = device.type == "cuda" and tc.precision != "fp32"
    amp_dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float16
    if tc.precision != "fp32" and device.type != "cuda" and rank == 0:
        print(f"[{label}] train.precision={tc.precision} applies on GPU only; training in fp32 on {device}")

    for stage_index in range(start_stage, len(stages)):
        stage, n_steps = stages[stage_index], stage_steps[stage_index]
        first_step = start_step if stage_index == start_stage else 0
        if first_step == 0:
            gen.begin_stage(stage.name)
        _set_trainable(gen, stage.modules)
        params = _stage_params(gen, stage.modules)
        model = ray.train.torch.prepare_model(gen) if world > 1 else gen
        batches = StepBatches(tensors, tc.batch_size, tc.seed, rank, cfg.data.augment_flip, rows=stage.rows,
                              stage=stage.name)
        optimizer = stage_optimizer(gen, stage, params, tc)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])  # the warm-up scales each group's own rate
        ema = _ema(params, tc.ema_decay) if tc.ema_decay else None
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
        if resume_state is not None and stage_index == start_stage and first_step > 0:
            optimizer.load_state_dict(resume_state["optimizer"])
            if ema is not None and resume_state.get("ema") is not None:
                ema.load_state_dict(resume_state["ema"])
                ema.to(device)

        model.train()
        t0, last_losses = time.perf_counter(), {}
        for step in range(first_step, n_steps):
            torch.manual_seed(_seed_for(tc.seed, rank, global_step))
            batch = batches(global_step, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                losses = model(batch, stage.name)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                values = {k: float(v.detach()) for k, v in losses.items()}
                raise NonFiniteLossError(
                    f"[{label}] training diverged: non-finite loss at stage {stage.name!r} step {step} "
                    f"(global step {global_step}): {values}. Lower train.lr, enable train.grad_clip, "
                    "or check the data."
                )
            if tc.warmup_steps:
                # A pure function of the stage step, so a resumed run gets the same rate.
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * min(1.0, (step + 1) / tc.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.step(params)
            global_step += 1
            last_losses = {f"{stage.name}/{k}": float(v.detach()) for k, v in losses.items()}

            done = step + 1 == n_steps
            if rank == 0 and ((step + 1) % tc.log_every == 0 or done):
                rate = (step + 1 - first_step) / max(time.perf_counter() - t0, 1e-9)
                shown = "  ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in last_losses.items())
                print(f"[{label}] stage {stage.name} step {step + 1}/{n_steps}  {shown}  {rate:.2f} it/s",
                      flush=True)
                if mlflow_client is not None:
                    from mlflow.entities import Metric

                    now = int(time.time() * 1000)
                    mlflow_client.log_batch(mlflow_run, metrics=[
                        Metric(k.replace("/", "_"), v, now, global_step) for k, v in last_losses.items()
                    ] + [Metric("it_per_s", rate, now, global_step)])

            if (step + 1) % tc.checkpoint_every == 0 or done:
                if done and ema is not None:
                    # A finished stage keeps its EMA weights: later stages build on those.
                    ema.copy_to(params)
                next_stage, next_step = (stage_index + 1, 0) if done else (stage_index, step + 1)
                metrics = {**last_losses, "loss": last_losses[f"{stage.name}/loss"], "global_step": global_step,
                           "stage": stage.name,
                           "stage_step": step + 1, "epoch_equiv": global_step * tc.batch_size / max(len(rows), 1)}
                state = {"stage_index": next_stage, "stage_step": next_step, "global_step": global_step,
                         "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema else None,
                         "metrics": metrics}
                _report(metrics, rank, local_root, global_step, tc.num_to_keep,
                        partial(_save, gen=gen, ema=None if done else ema, params=params, state=state))
        del model
    if not stages and resume_state is None:
        # A model-free method (no stages) still leaves a loadable checkpoint.
        state = {"stage_index": 0, "stage_step": 0, "global_step": 0, "optimizer": None, "ema": None}
        _report({"global_step": 0, "stage": "none"}, rank, local_root, 0, tc.num_to_keep,
                lambda d: _save(d, gen, None, [], state))
    if rank == 0:
        print(f"[{label}] finished {global_step} steps", flush=True)

