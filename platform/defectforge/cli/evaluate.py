"""``defectforge evaluate``: judge a checkpoint or a folder / Parquet of generated pairs (``evaluate.run``)."""

from __future__ import annotations

import argparse
from typing import Any

from defectforge.cli.common import config_args, resolve


def add_evaluate_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``defectforge evaluate`` (also used by ``jobs/evaluate.py``)."""
    p = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint or generated pairs: FID/KID/IS, LPIPS, masks, downstream gain",
        description="Evaluate a generator: generate pairs on Ray Data actors (or read a folder / Parquet of "
                    "pairs), compute fidelity, diversity and mask metrics against the real data, train a "
                    "segmenter on real vs real + synthetic data, print a table, write a JSON summary and log "
                    "one MLflow run.")
    config_args(p, method_default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="generator dir (config.json + *.safetensors)")
    src.add_argument("--generated", metavar="DIR_OR_PARQUET", help="pairs in MVTec layout or a Parquet file")
    p.add_argument("--data", metavar="PATH", help="real dataset root (default: built-in synthetic)")
    p.add_argument("--out", metavar="DIR", help="output dir (default: <run_root>/evaluations/<name>)")
    p.add_argument("--name", help="evaluation run name")
    p.add_argument("--summary-json", metavar="FILE", help="write the summary JSON here too")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output folder whole when it holds an earlier defectforge output")
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defectforge.evaluate.run import evaluate, explicit_sampling

    extra: dict[str, Any] = {"data": {}}
    if args.data:
        extra["data"]["path"] = args.data
    if args.checkpoint and not getattr(args, "method", None):
        from defectforge.methods.base import read_checkpoint_meta

        args.method = read_checkpoint_meta(args.checkpoint)["method"]
    cfg = resolve(args, extra)
    sampling = None
    if args.checkpoint:
        base = resolve(argparse.Namespace(**{**vars(args), "config": None, "overrides": []}), extra)
        named = {text.split("=", 1)[0].strip() for text in (args.overrides or []) if "=" in text}
        sampling = explicit_sampling(cfg, base, args.checkpoint, named)
    evaluate(cfg, checkpoint=args.checkpoint, generated=args.generated, out=args.out,
             summary_json=args.summary_json, log_to_mlflow=not args.no_mlflow, name=args.name,
             overwrite=getattr(args, "overwrite", False), sampling=sampling)
    return 0
