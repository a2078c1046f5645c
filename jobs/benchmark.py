"""Benchmarks: ``python jobs/benchmark.py {eval,train,sample,sweep}``, each a ratio measured in one run.

``eval``: the Ray Data evaluation pipeline vs a plain loop (below). ``train``: a training step's
achieved GFLOP/s as a fraction of this machine's matmul rate. ``sample``: Defect-Gen's fast
sampler vs the official 1000-step DDPM, pairs/s and KID. ``sweep``: a sweep's wall time vs the sum
of its trials' own train + evaluate times.

``eval`` in detail:

Both sides do the same work on the same conditions: generate ``n_per_defect`` pairs per
(product, defect) from one checkpoint, extract features and logits of the generated and real
reference images, FID statistics, KID, IS, LPIPS / IC-LPIPS and mask quality per group. The
sequential side runs everything in this process, one batch after another; the pipeline side runs
``evaluate.pipeline.run_pipeline`` on the local Ray cluster, per-group FID, KID and IS included
(its ``classes`` argument; until 2026-12-02 the benchmark stopped before them, leaving ~0.5 s of
the loop's 3.1 s at 384 pairs out of the pipeline's side). Segmentation is left out of both (it
dominates and is the same Ray tasks either way). Prints both times and their ratio.

Without ``--checkpoint`` a Crop-Paste checkpoint is built from the data's few-shot training split
(what ``defectforge train --method crop-paste`` writes, without Ray Train's start-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _checkpoint(cfg, out: Path) -> Path:
    from defectforge.methods.base import build_generator
    from defectforge.train.data import load_training_data

    data = load_training_data(cfg)
    gen = build_generator(cfg.method, data.context)
    gen.prepare_from_data(data.rows)
    return gen.save_pretrained(out / "crop-paste")


def sequential(cfg, checkpoint: Path, rows, real, references, extractor_kind: str, lpips_kind: str) -> dict:
    """The same evaluation work as the pipeline, in one process."""
    from defectforge.evaluate.metrics import (
        GaussianStats,
        build_lpips,
        diversity_lpips,
        fid_from_stats,
        inception_score_from_logits,
        kid,
        make_extractor,
        mask_quality,
    )
    from defectforge.generate import ConditionSource, GenerationPlan, sample_pairs
    from defectforge.methods.base import SamplingOptions, load_generator

    gen = load_generator(checkpoint)
    source = ConditionSource.for_generator(gen, str(cfg.data.path), cfg.data.split, seed=cfg.sampling.seed)
    extractor = make_extractor(extractor_kind, cfg.evaluation.weights_dir)
    lpips = build_lpips(lpips_kind, cfg.evaluation.weights_dir)
    bs = cfg.sampling.batch_size
    options = SamplingOptions(sampler=cfg.sampling.sampler, steps=cfg.sampling.steps,
                              method=gen.default_sampling.method)
    groups: dict = defaultdict(lambda: {"img": [], "mask": [], "f": [], "l": []})
    for start in range(0, len(rows), bs):
        chunk = rows[start:start + bs]
        plan = GenerationPlan([r["product"] for r in chunk], [r["defect"] for r in chunk])
        pairs, _ = sample_pairs(gen, plan, cfg.sampling.seed * 1_000_003 + chunk[0]["index"], len(chunk),
                                progress=False, source=source, options=options)
        images = np.stack([p["image"] for p in pairs])
        f, lg = extractor.features(images), extractor.logits(images)
        for i, p in enumerate(pairs):
            g = groups[(p["product"], p["defect"])]
            g["img"].append(p["image"]), g["mask"].append(p["mask"]), g["f"].append(f[i]), g["l"].append(lg[i])
    real_feats: dict = defaultdict(list)
    for start in range(0, len(real), bs):
        chunk = real[start:start + bs]
        f = extractor.features(np.stack([r["image"] for r in chunk]))
        for i, r in enumerate(chunk):
            real_feats[(r["product"], r["defect"])].append(f[i])
    out = {}
    for key, g in groups.items():
        fg, fr = np.stack(g["f"]), np.stack(real_feats[key])
        ref = references[f"{key[0]}/{key[1]}"]
        out[key] = {"fid": fid_from_stats(GaussianStats.of(fg), GaussianStats.of(fr)), "kid": kid(fg, fr),
                    "is": inception_score_from_logits(np.stack(g["l"]), splits=1).mean,
                    **dict(zip(("lpips", "ic_lpips"), diversity_lpips(np.stack(g["img"]), ref["centres"], lpips,
                                                                      max_pairs=2000))),
                    **mask_quality(g["mask"], list(ref["masks"]))}
    return out


def _ray(address: str | None) -> None:
    """A fresh local cluster unless an address is given: another local cluster on this machine
    (another user's tests) must neither be joined by accident nor slow the figures."""
    import os

    import ray

    from defectforge.cluster import ensure_ray

    ensure_ray(address or os.environ.get("RAY_ADDRESS") or "local")
    ray.data.DataContext.get_current().enable_progress_bars = False


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="generator dir (default: a Crop-Paste checkpoint built from the data)")
    p.add_argument("--data", help="dataset root (default: built-in synthetic)")
    p.add_argument("--n-per-defect", type=int, default=16)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--out", default=None, help="scratch dir (default: a temporary one)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (loop, pipeline on warm workers) timed alternately; the ratio is the median "
                        "round's (this host's speed drifts within minutes)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def bench_eval(args: argparse.Namespace) -> dict:
    """Plain loop vs Ray Data pipeline on the same conditions; returns the figures."""
    from defectforge.config import resolve_config
    from defectforge.evaluate.pipeline import (
        PipelineSpec,
        conditions_rows,
        diversity_on_driver,
        generated_from_checkpoint,
        run_pipeline,
    )
    from defectforge.evaluate.run import load_real
    from defectforge.methods.base import read_checkpoint_meta
    from defectforge.train.data import resolve_data_root

    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    scratch = Path(args.out or tempfile.mkdtemp(prefix="df-bench-"))
    method = read_checkpoint_meta(args.checkpoint)["method"] if args.checkpoint else "crop-paste"
    cfg = resolve_config(method=method, preset="tiny", overrides=[
        f"tracking.run_root={scratch}", "evaluation.feature_extractor=randfeat",
        f"evaluation.n_per_defect={args.n_per_defect}", f"evaluation.num_actors={args.num_actors}",
        *([f"data.path={args.data}"] if args.data else []), *args.overrides])
    root = resolve_data_root(cfg)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(root)})})
    checkpoint = Path(args.checkpoint) if args.checkpoint else _checkpoint(cfg, scratch)
    context = read_checkpoint_meta(checkpoint)["context"]
    classes = {p: tuple(c) for p, c in context["classes"].items()}
    rows = conditions_rows(classes, args.n_per_defect)
    real = load_real(cfg, root, list(classes), int(context["resolution"]))
    references = reference_sets(real)

    from defectforge.methods.base import SamplingOptions, checkpoint_sampling

    options = SamplingOptions(sampler=cfg.sampling.sampler, steps=cfg.sampling.steps,
                              method=checkpoint_sampling(read_checkpoint_meta(checkpoint)).method)
    import torch

    # The loop first in this process (cold, against the pipeline's first run on a fresh cluster),
    # then ``--rounds`` rounds of: the loop on torch's default threads, the loop on one thread (not
    # always slower on small convolutions; the round's baseline is the faster of the two) and the
    # pipeline again on the same workers. The reported ratio is the median of the rounds' ratios:
    # this host's speed drifts within minutes (2026-12-02: the same loop took 2.8-3.3 s in one
    # hour), so each ratio compares runs seconds apart.
    threads = torch.get_num_threads()

    def loop(n_threads: int) -> float:
        torch.set_num_threads(n_threads)
        t = time.perf_counter()
        sequential(cfg, checkpoint, rows, real["reference"], references, "randfeat", "randnet")
        torch.set_num_threads(threads)
        return time.perf_counter() - t

    _ray(args.address)
    spec = PipelineSpec(extractor="randfeat", weights_dir=None, lpips_kind="randnet", num_actors=args.num_actors,
                        batch_size=cfg.sampling.batch_size, seed=cfg.sampling.seed,
                        diversity_on_driver=diversity_on_driver(cfg.evaluation.diversity, len(rows),
                                                                int(context["resolution"])),
                        lpips_in_pass=cfg.evaluation.diversity == "auto")  # as ``evaluate`` builds it

    rows_groups = sorted({(r["product"], r["defect"]) for r in rows})

    def pipeline(attempt: str):
        t = time.perf_counter()
        gen = generated_from_checkpoint(checkpoint, rows, spec, options, data_root=str(root),
                                        split=cfg.data.split.model_dump(mode="json"))
        result = run_pipeline(gen, real["reference"], references, spec, scratch / f"artifacts-{attempt}",
                              classes=classes, fidelity_scope="groups")  # the loop's per-group FID, KID, IS
        missing = [k for k in rows_groups if k not in result.fidelity]
        if missing:
            raise RuntimeError(f"the pipeline computed no FID/KID/IS for {missing}")
        return time.perf_counter() - t, result

    seq_first_s = loop(threads)
    cold_s, cold = pipeline("first")  # a fresh cluster's workers
    rounds = []
    for r in range(args.rounds):  # the same workers again
        default_s, one_s = loop(threads), loop(1)
        warm_s, warm = pipeline(f"again-{r}")
        rounds.append({"loop_default_threads_s": default_s, "loop_one_thread_s": one_s,
                       "baseline_s": min(default_s, one_s), "pipeline_s": warm_s,
                       "ratio": warm_s / min(default_s, one_s), "timings": warm.timings})
    mid = sorted(rounds, key=lambda x: x["ratio"])[len(rounds) // 2]  # the median round
    seq_s, warm_s, seq_default_s, seq_one_s = (mid[k] for k in ("baseline_s", "pipeline_s", "loop_default_threads_s",
                                                                 "loop_one_thread_s"))

    print(f"[benchmark eval] {len(rows)} pairs ({method}), {len(real['reference'])} real reference images, "
          f"batch size {spec.batch_size}, {args.num_actors} concurrent map task(s), diversity "
          + ("as tasks from LPIPS embeddings made in the pass" if cold.lpips_in_pass else
             "on the driver" if spec.diversity_on_driver else "as tasks from the pair blocks"))
    print(f"  sequential loop, first           : {seq_first_s:8.2f} s  ({threads} torch threads)")
    print(f"  pipeline, first on this cluster  : {cold_s:8.2f} s  ratio {cold_s / seq_first_s:.2f}  ("
          + ", ".join(f"{k} {v:.2f}" for k, v in cold.timings.items()) + ")")
    for r, x in enumerate(rounds):
        print(f"  round {r + 1}: loop {x['loop_default_threads_s']:.2f} s ({threads} threads) / "
              f"{x['loop_one_thread_s']:.2f} s (1 thread), pipeline again {x['pipeline_s']:.2f} s, ratio "
              f"{x['ratio']:.2f}  (" + ", ".join(f"{k} {v:.2f}" for k, v in x["timings"].items()) + ")")
    print(f"  ratio pipeline/sequential: {mid['ratio']:.2f} warm (median of {len(rounds)} rounds: every evaluation of "
          f"a sweep after its first, against the loop's best warm run of the round), {cold_s / seq_first_s:.2f} first "
          f"(fresh workers import torch and build their models once; against the loop's first run)")
    return {"benchmark": "eval", "pairs": len(rows), "method": method, "num_actors": args.num_actors,
            "real_images": len(real["reference"]), "baseline": "sequential loop", "baseline_s": seq_s,
            "baseline_default_threads_s": seq_default_s, "baseline_one_thread_s": seq_one_s,
            "measured": "Ray Data pipeline (warm workers)", "measured_s": warm_s, "ratio": mid["ratio"],
            "rounds": rounds,
            "first_s": cold_s, "baseline_first_s": seq_first_s, "ratio_first": cold_s / seq_first_s,
            "pipeline_timings": mid["timings"], "pipeline_timings_first": cold.timings}


def reference_sets(real: dict) -> dict:
    """``"product/defect" -> {"centres": few-shot train images, "masks": reference masks}`` (as evaluate does)."""
    references: dict = defaultdict(lambda: {"centres": [], "masks": []})
    for r in real["few_shot"]:
        references[f"{r['product']}/{r['defect']}"]["centres"].append(r["image"])
    for r in real["reference"]:
        references[f"{r['product']}/{r['defect']}"]["masks"].append(r["mask"])
    return {k: {kk: np.stack(vv) for kk, vv in v.items()} for k, v in references.items()}


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="laptop", choices=("tiny", "laptop", "paper"))
    p.add_argument("--method", default="defect-gen")
    p.add_argument("--steps", type=int, default=12, help="timed training steps per round (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of (steps, matmul) timed alternately; the figures are the medians of the rounds' "
                        "rates, so both see the same machine (a shared host's speed drifts within minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a sweep trial gets 1)")
    p.add_argument("--channels-last", action="store_true", help="model and batches in channels-last memory format")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _matmul_rate(threads: int, n: int = 1024, reps: int = 20) -> float:
    """fp32 GFLOP/s of a square matmul on ``threads`` threads: the machine's attainable dense rate."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def bench_train(args: argparse.Namespace) -> dict:
    """A training step's achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode on one step,
    forward + backward) as a fraction of the one-thread matmul rate, both measured in this run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from defectforge.config import resolve_config
    from defectforge.methods.base import build_generator
    from defectforge.train.data import StepBatches, load_training_data, rows_to_tensors
    from defectforge.train.loop import stage_optimizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(args.method, args.preset, None, [f"tracking.run_root={tmp}", *args.overrides])
        data = load_training_data(cfg, [cfg.data.products[0]] if cfg.data.products else None)
    gen = build_generator(cfg.method, data.context)
    stage = gen.stages()[0]
    params = [p for p in gen.parameters() if p.requires_grad]
    opt = stage_optimizer(gen, stage, params, cfg.train)  # the optimiser training builds
    batches = StepBatches(rows_to_tensors(data.rows, data.context), cfg.train.batch_size, 0, 0)

    if args.channels_last:
        gen = gen.to(memory_format=torch.channels_last)

    def step(i: int) -> None:
        torch.manual_seed(i)
        batch = batches(i, torch.device("cpu"))
        if args.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                     for k, v in batch.items()}
        loss = gen.training_step(batch, stage.name)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = counter.get_total_flops()
    for i in range(1, 3):
        step(i)
    # Alternate the two measurements: on a shared host the attainable rate drifts by 2-3x within
    # minutes (2026-12-01 here: matmul 54-67 GFLOP/s, earlier runs 161-193), so a step timed first
    # and a matmul timed after can disagree by more than the figure being measured. Each round
    # gives one fraction from rates measured seconds apart; the medians are reported.
    per_steps, matmuls, fractions = [], [], []
    i = 3
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(i)
            i += 1
        per_steps.append((time.perf_counter() - t0) / args.steps)
        matmuls.append(_matmul_rate(args.threads))
        fractions.append(flops / per_steps[-1] / 1e9 / matmuls[-1])
    per_step, matmul, fraction = (statistics.median(v) for v in (per_steps, matmuls, fractions))
    achieved = flops / per_step / 1e9
    figures = {"preset": args.preset, "threads": args.threads, "channels_last": args.channels_last,
               "rounds": args.rounds, "step_s": per_step, "gflop_per_step": flops / 1e9,
               "achieved_gflops": achieved, "matmul_gflops": matmul, "fraction_of_matmul": fraction,
               "fraction_per_round": fractions}
    print(f"[benchmark] train {args.method}/{args.preset}, batch {cfg.train.batch_size}, {args.threads} thread(s), "
          f"medians of {args.rounds} rounds: {per_step:.3f} s/step, {flops / 1e9:.2f} GFLOP/step -> "
          f"{achieved:.1f} GFLOP/s; matmul {matmul:.1f} GFLOP/s; fraction of matmul rate {fraction:.2f} "
          f"(rounds: {', '.join(f'{f:.2f}' for f in fractions)})")
    return figures


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a trained Defect-Gen generator dir, e.g. the main job's best "
                                        "(default: train the laptop preset here first, about 6 minutes)")
    p.add_argument("--data", help="dataset root (default: built-in synthetic)")
    p.add_argument("--n-per-defect", type=int, default=16, help="pairs per defect type on each side")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of the fast sampler (default: sampling.steps "
                                                          "of the laptop preset, 25)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (an evaluation actor gets 1)")
    p.add_argument("--out", default=None, help="scratch dir (default: a temporary one)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _generator_dir(path: Path) -> Path:
    """A Train checkpoint holds the generator in ``generator/``; accept either."""
    return path / "generator" if (path / "generator" / "config.json").is_file() else path


def bench_sample(args: argparse.Namespace) -> dict:
    """Pairs/s of the fast sampler (DDIM, ``--steps``) against the official procedure (DDPM over
    all T = 1000 steps), on the same trained generator, conditions and seed; KID of each side
    against the same real images (randfeat features, pooled over types) says whether the quality
    is equal (goal: within 10 %)."""
    import torch

    from defectforge.config import resolve_config
    from defectforge.evaluate.metrics import kid, make_extractor
    from defectforge.evaluate.pipeline import conditions_rows
    from defectforge.evaluate.run import load_real
    from defectforge.generate import ConditionSource, GenerationPlan, sample_pairs
    from defectforge.methods.base import SamplingOptions, load_generator
    from defectforge.train.data import resolve_data_root

    torch.set_num_threads(args.threads)
    scratch = Path(args.out or tempfile.mkdtemp(prefix="df-bench-"))
    cfg = resolve_config("defect-gen", "laptop", None, [
        f"tracking.run_root={scratch}", *([f"data.path={args.data}"] if args.data else []), *args.overrides])
    root = resolve_data_root(cfg)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(root)})})
    if args.checkpoint:
        checkpoint = _generator_dir(Path(args.checkpoint))
    else:
        from defectforge.train.runner import train

        _ray(args.address)
        print("[benchmark sample] no --checkpoint: training the laptop preset first", flush=True)
        [outcome] = train(cfg, scratch / "train", name="bench", log_to_mlflow=False)
        if outcome.error or outcome.checkpoint is None:
            raise SystemExit(f"error: training for the sample benchmark failed: {outcome.error}")
        checkpoint = _generator_dir(Path(outcome.checkpoint))
    gen = load_generator(checkpoint)
    if gen.config.name != "defect-gen":
        raise SystemExit(f"error: --checkpoint {checkpoint} is a {gen.config.name} generator; the sample "
                         "benchmark compares Defect-Gen's samplers")
    classes = {p: tuple(gen.context.classes[p]) for p in gen.context.products}
    rows = conditions_rows(classes, args.n_per_defect)
    real = load_real(cfg, root, list(classes), gen.context.resolution)["reference"]
    source = ConditionSource.for_generator(gen, str(root), cfg.data.split, seed=cfg.sampling.seed)
    extractor = make_extractor("randfeat", None)
    real_f = extractor.features(np.stack([r["image"] for r in real]))
    plan = GenerationPlan([r["product"] for r in rows], [r["defect"] for r in rows])
    fast_steps = args.steps or cfg.sampling.steps

    def side(sampler: str, steps: int | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        options = gen.default_sampling.merged(sampler=sampler, steps=steps)
        if steps is None:
            options = SamplingOptions(sampler=sampler, steps=None, method=options.method)
        pairs, _ = sample_pairs(gen, plan, cfg.sampling.seed, cfg.sampling.batch_size, progress=False,
                                source=source, options=options)
        seconds = time.perf_counter() - t0
        f = extractor.features(np.stack([p["image"] for p in pairs]))
        return seconds, kid(f, real_f)

    T = gen.config.num_train_timesteps
    u = gen.default_sampling.method.get("u", gen.config.u)  # the recorded sampling u (a trial's): both sides
    print(f"[benchmark sample] {len(rows)} pairs of {checkpoint}, u = {u}, batch {cfg.sampling.batch_size}, "
          f"{args.threads} thread(s); the official side (DDPM, {T} steps) takes a while", flush=True)
    fast_s, fast_kid = side("ddim", fast_steps)
    print(f"  fast sampler (DDIM, {fast_steps} steps): {fast_s:8.2f} s, {len(rows) / fast_s:.2f} pairs/s, "
          f"KID {fast_kid:.5f}", flush=True)
    slow_s, slow_kid = side("ddpm", None)
    print(f"  official (DDPM, {T} steps)     : {slow_s:8.2f} s, {len(rows) / slow_s:.3f} pairs/s, KID {slow_kid:.5f}")
    rel = (fast_kid - slow_kid) / abs(slow_kid) if slow_kid else float("nan")
    verdict = "lower: better" if rel < -0.10 else ("within 10 %" if rel <= 0.10 else "MORE than 10 % worse")
    print(f"  ratio pairs/s fast/official: {slow_s / fast_s:.1f}x (goal >= 20 at a KID no more than 10 % above "
          f"the official's); KID fast vs official {rel:+.1%} ({verdict}; KID of {len(rows)} pairs is noisy)")
    return {"benchmark": "sample", "pairs": len(rows), "checkpoint": str(checkpoint), "u": u,
            "baseline": f"DDPM {T} steps", "baseline_s": slow_s, "baseline_kid": slow_kid,
            "measured": f"DDIM {fast_steps} steps", "measured_s": fast_s, "measured_kid": fast_kid,
            "ratio": slow_s / fast_s, "kid_relative_difference": rel}


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-summary", metavar="JSON", help="an earlier sweep's --summary-json (e.g. the main job's) "
                                                          "instead of running a sweep here")
    p.add_argument("--preset", default="tiny", choices=("tiny", "laptop", "paper"))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--out", default=None, help="scratch dir (default: a temporary one)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def bench_sweep(args: argparse.Namespace) -> dict:
    """A sweep's wall time against the sum of its trials' own work (each trial's training, when it
    trained, + its evaluation, as the trials timed themselves): what Tune, MLflow, Ray start-up
    and waiting add, less what running trials side by side saves. Goal <= 1.15."""
    import json

    if args.from_summary:
        summary = json.loads(Path(args.from_summary).read_text())
    else:
        from defectforge.config import resolve_config
        from defectforge.sweep.run import sweep
        from defectforge.train.data import resolve_data_root

        scratch = Path(args.out or tempfile.mkdtemp(prefix="df-bench-"))
        cfg = resolve_config("defect-gen", args.preset, None, [
            f"tracking.run_root={scratch}", f"sweep.num_trials={args.trials}",
            f"sweep.max_concurrent={args.concurrency}",
            "sweep.register_model=false", "evaluation.feature_extractor=randfeat", *args.overrides])
        root = resolve_data_root(cfg)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(root)})})
        _ray(args.address)
        summary = sweep(cfg)
    trials = [t for s in summary["studies"] for t in s["trials"] if t.get("status") == "done"]
    timed = [t for t in trials if "eval_s" in t]
    if not timed:
        raise SystemExit("error: no finished trial with its own times (train_s, eval_s) in the summary; "
                         "sweeps record them since this version")
    own = sum(t.get("train_s", 0.0) + t["eval_s"] for t in timed)
    wall = float(summary["duration_s"])
    trained = sum(t.get("train_s", 0) > 0 for t in timed)
    print(f"[benchmark sweep] {len(timed)} finished trial(s), {trained} trained here")
    print(f"  sum of the trials' own train + evaluate: {own:8.1f} s "
          f"(train {sum(t.get('train_s', 0.0) for t in timed):.1f} s, "
          f"evaluate {sum(t['eval_s'] for t in timed):.1f} s)")
    print(f"  sweep wall time                        : {wall:8.1f} s")
    print(f"  ratio wall / own: {wall / own:.2f} (goal <= 1.15)")
    return {"benchmark": "sweep", "trials": len(timed), "baseline": "sum of trials' own train + evaluate",
            "baseline_s": own, "measured": "sweep wall time", "measured_s": wall, "ratio": wall / own}


#: subcommand -> (add its arguments, run it and return its figures)
BENCHMARKS = {"eval": (add_eval_args, bench_eval), "train": (add_train_args, bench_train),
              "sample": (add_sample_args, bench_sample), "sweep": (add_sweep_args, bench_sweep)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobs/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (add_args, _) in BENCHMARKS.items():
        p = sub.add_parser(name, help=f"the {name} benchmark")
        p.add_argument("--json", metavar="PATH", help="also write the figures as JSON (for the README's table)")
        p.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, else a fresh local one)")
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    load_start = os.getloadavg()[0]
    figures = BENCHMARKS[args.benchmark][1](args)
    load_end = os.getloadavg()[0]
    print(f"  machine load (1-min average) at start {load_start:.1f}, at end {load_end:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        import json
        import platform

        figures = {**figures, "argv": sys.argv[1:] if argv is None else argv, "cpus": os.cpu_count(),
                   "load_avg_1m_start": load_start, "load_avg_1m_end": load_end, "machine": platform.machine(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, default=float) + "\n")
        print(f"[benchmark] figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
