"""``defectforge train``: one generator per product (concurrent Ray Train runs) or one across products."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from defectforge.cli.common import config_args, products, resolve


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a generator with Ray Train (per product or across products)",
                       description="Train a generator. Per-product mode trains one generator per product "
                                   "(concurrent Ray Train runs); multi-product mode one generator "
                                   "conditioned on product and defect type. Re-running with the same "
                                   "--out and --name resumes from the latest checkpoint.")
    config_args(p)
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


def cmd_train(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"data": {}, "train": {}, "tracking": {}}
    if args.data:
        extra["data"]["path"] = args.data
    if products(args):
        extra["data"]["products"] = products(args)
    if args.mode:
        extra["train"]["mode"] = args.mode
    if args.out:
        extra["tracking"]["run_root"] = args.out
    if args.name is not None:
        from defectforge.errors import ConfigError
        from defectforge.paths import safe_component

        safe_component(args.name, "--name", error=ConfigError)  # it becomes <out>/<name>
    cfg = resolve(args, extra)

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
