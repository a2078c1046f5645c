"""``defectforge`` command line: data, config, train, generate, evaluate, sweep.

Every command that takes a config resolves it the same way: ``--preset`` (tiny | paper), then
``--config FILE.yaml``, then the command's own flags, then trailing dotted ``key=value``
overrides (``train.lr=3e-4 method.u=300``). The config is validated before anything heavy is
imported or started, so a bad value fails in seconds naming the field.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable


def _config_args(p: argparse.ArgumentParser, method_default: str | None = "defect-gen") -> None:
    p.add_argument("--method", default=method_default, help="generator to use (default: %(default)s)")
    p.add_argument("--preset", choices=("tiny", "laptop", "paper"), default=None,
                   help="tiny = seconds-scale test sizes (default); laptop = meaningful output on 2 CPUs "
                        "in minutes; paper = the papers' settings (GPU)")
    p.add_argument("--config", metavar="FILE", help="YAML file refining the preset")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides applied last, e.g. train.steps=500 method.u=300")


def _resolve(args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    from defectforge.config import resolve_config

    return resolve_config(method=args.method, preset=args.preset, config_file=args.config,
                          overrides=args.overrides, extra=extra)


def _products(args: argparse.Namespace) -> list[str] | None:
    if getattr(args, "product", None):
        return [args.product]
    if getattr(args, "products", None):
        return [p.strip() for p in args.products.split(",") if p.strip()]
    return None


# --------------------------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = _resolve(args, {})
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


# ---------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"data": {}, "train": {}, "tracking": {}}
    if args.data:
        extra["data"]["path"] = args.data
    if _products(args):
        extra["data"]["products"] = _products(args)
    if args.mode:
        extra["train"]["mode"] = args.mode
    if args.out:
        extra["tracking"]["run_root"] = args.out
    if args.name is not None:
        from defectforge.errors import ConfigError
        from defectforge.paths import safe_component

        safe_component(args.name, "--name", error=ConfigError)  # it becomes <out>/<name>
    cfg = _resolve(args, extra)

    from defectforge.train.runner import train

    outcomes = train(cfg, out=cfg.tracking.run_root, name=args.name, log_to_mlflow=not args.no_mlflow,
                     overwrite=args.overwrite)
    failed = 0
    print("\nrun                                   status    checkpoint")
    for o in outcomes:
        status = "ok" if o.ok else "FAILED"
        failed += not o.ok
        print(f"{o.name:<38}{status:<10}{o.checkpoint or o.error}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps([
            {"name": o.name, "products": o.products, "checkpoint": str(o.checkpoint) if o.checkpoint else None,
             "error": o.error, "metrics": {k: v for k, v in o.metrics.items() if isinstance(v, (int, float, str))},
             "mlflow_run_id": o.mlflow_run_id} for o in outcomes], indent=2))
    if any(o.ok for o in outcomes):
        first = next(o for o in outcomes if o.ok)
        print(f"\nnext: defectforge generate --checkpoint {first.checkpoint} --n 16 --out generated")
    return 1 if failed else 0


# ------------------------------------------------------------------------------- generate
def _at_least(flag: str, value: int | None, minimum: int) -> None:
    from defectforge.errors import ConfigError

    if value is not None and value < minimum:
        raise ConfigError(f"{flag}: must be at least {minimum}, got {value}")


def cmd_generate(args: argparse.Namespace) -> int:
    from defectforge.cluster import resolve_device
    from defectforge.config import parse_override
    from defectforge.errors import ConfigError, DataError
    from defectforge.generate import GenerationPlan, sample_pairs, write_pairs
    from defectforge.methods.base import (GeneratorContext, check_checkpoint_sampling, checkpoint_sampling,
                                          load_generator, read_checkpoint_meta)
    from defectforge.paths import claim_output

    # Everything that can be known without the model is checked first, in seconds, so a bad
    # argument never costs a model load or a sampling run.
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--max-attempts", args.max_attempts),
                        ("--steps", args.steps)):
        _at_least(flag, value, 1)
    meta = read_checkpoint_meta(args.checkpoint)  # every field checked, naming config.json
    defects = [d.strip() for d in args.defects.split(",") if d.strip()] if args.defects else None
    GenerationPlan.balanced(GeneratorContext.from_json(meta["context"]), args.n, _products(args), defects)
    method_fields: dict[str, Any] = {}
    for text in args.overrides:
        path, value = parse_override(text)
        if path[0] == "method":
            path = path[1:]
        if len(path) != 1:
            raise ConfigError(f"generate accepts method-field overrides only (method.<field>=value), got {text!r}")
        method_fields[path[0]] = value
    # The checkpoint's recorded options, with what the user asked for on top; checked against the
    # method's config model before the model is loaded.
    options = checkpoint_sampling(meta).merged(sampler=args.sampler, steps=args.steps, method=method_fields)
    check_checkpoint_sampling(meta, options)
    if args.data and not Path(args.data).is_dir():
        raise DataError(f"--data {args.data}: dataset folder not found")
    device = resolve_device(args.device)
    claim_output(args.out, "generate", overwrite=args.overwrite, create=False)  # refuse before sampling
    gen = load_generator(args.checkpoint, device=device)
    plan = GenerationPlan.balanced(gen.context, args.n, _products(args), defects)
    from defectforge.generate import ConditionSource

    source = ConditionSource.for_generator(gen, args.data)
    shown = f"{options.sampler}, {options.steps or 'all'} steps" + "".join(
        f", {k}={v}" for k, v in {**options.method, **options.guidance}.items())
    print(f"[generate] {args.n} pairs from {args.checkpoint} ({gen.method_name()}, {device}) seed {args.seed}; "
          f"sampling: {shown}", flush=True)
    rows, stats = sample_pairs(gen, plan, args.seed, args.batch_size, reject_empty=not args.keep_empty,
                               max_attempts=args.max_attempts, source=source, options=options)
    out, _ = claim_output(args.out, "generate", overwrite=args.overwrite)
    out = write_pairs(rows, out, gen.context)
    info = {"checkpoint": str(Path(args.checkpoint).resolve()), "n": args.n, "seed": args.seed,
            "sampling": options.to_json(), **stats}
    (out / "generation.json").write_text(json.dumps(info, indent=2))
    print(f"[generate] wrote {len(rows)} pairs to {out} (redrawn empty masks: {stats['redrawn']}, "
          f"still empty: {stats['still_empty']})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from defectforge.sweep.cli import run_sweep_command

    return run_sweep_command(args, method=args.method)


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectforge",
        description="Few-shot industrial defect-image generation: synthesise and check data, train "
                    "generators on Ray Train, generate image + mask pairs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from defectforge.data.commands import add_data_commands

    add_data_commands(sub)

    p = sub.add_parser("config", help="print the resolved configuration (preset + file + overrides)")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train a generator with Ray Train (per product or across products)",
                       description="Train a generator. Per-product mode trains one generator per product "
                                   "(concurrent Ray Train runs); multi-product mode one generator "
                                   "conditioned on product and defect type. Re-running with the same "
                                   "--out and --name resumes from the latest checkpoint.")
    _config_args(p)
    p.add_argument("--data", metavar="PATH", help="dataset root in MVTec layout (default: built-in synthetic)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--product", help="train on this product only")
    g.add_argument("--products", help="comma-separated products (each its own run unless --mode multi-product)")
    p.add_argument("--mode", choices=("per-product", "multi-product"), help="default: train.mode")
    p.add_argument("--out", metavar="DIR", help="run root: checkpoints, Ray storage, mlflow.db (default: runs)")
    p.add_argument("--name", help="run name (default: train-<method>-<products>); same name resumes")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--summary-json", metavar="FILE", help="write the outcomes as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain from scratch: replace the run folder <out>/<name> (and its checkpoints) "
                        "instead of resuming it; without it, a resume must match the run's data, split "
                        "and training config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample image + mask pairs from a checkpoint into MVTec layout + Parquet")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="generator dir (config.json + *.safetensors)")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampling steps; default: the checkpoint's recorded sampling options "
                                             "(a swept checkpoint: its winning trial's)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=8)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--product")
    g.add_argument("--products", help="comma-separated products (default: all the checkpoint knows)")
    p.add_argument("--defects", help="comma-separated defect types (default: all)")
    p.add_argument("--keep-empty", action="store_true", help="keep pairs whose mask is empty")
    p.add_argument("--max-attempts", type=int, default=4, help="draws per pair when redrawing empty masks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out whole when it holds an earlier defectforge output (never a folder "
                        "defectforge did not create)")
    p.add_argument("--data", metavar="PATH",
                   help="dataset whose train/good images (and train masks) methods such as crop-paste need")
    p.add_argument("overrides", nargs="*", metavar="method.field=value",
                   help="sampling-time method fields, e.g. method.u=300 for Defect-Gen's switch timestep "
                        "(default: the checkpoint's); fields that shape the weights are refused")
    p.set_defaults(func=cmd_generate)

    from defectforge.evaluate.run import add_evaluate_command

    add_evaluate_command(sub)

    p = sub.add_parser("sweep", help="sweep a method's hyper-parameters (Ray Tune + Optuna, MLflow runs)",
                       description="Sweep hyper-parameters over search_spaces/<method>.yaml: each trial trains "
                                   "(Ray Train), evaluates and reports the objective; the best generator is "
                                   "registered in MLflow with the alias 'best'. Re-running with the same "
                                   "--name and storage resumes an interrupted sweep.")
    _config_args(p)
    from defectforge.sweep.cli import add_sweep_arguments

    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors exit 2 with one clear line (``run_reporting_user_errors``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_reporting_user_errors(lambda: args.func(args))


def run_reporting_user_errors(fn: Callable[[], int | None]) -> int:
    """Call ``fn``; a ``DefectforgeError`` (bad config, data, checkpoint, output folder, tracking
    URI, device) prints ``error: <message>`` to stderr and returns 2. Anything else is a bug and
    keeps its traceback (a ``KeyError`` from a bug must not pass for a user error). Shared with
    ``jobs/*.py``."""
    from defectforge.errors import DefectforgeError

    try:
        return int(fn() or 0)
    except DefectforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
