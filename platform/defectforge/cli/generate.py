"""``defectforge generate``: sample image + mask pairs from a checkpoint with its recorded sampling options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from defectforge.cli.common import at_least, products


def add_generate_command(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--keep-empty", action="store_true",
                   help="keep every first draw, also pairs whose mask holds no pixel of their defect "
                        "(default: redraw those up to --max-attempts times, leave out the ones still "
                        "without and say how many)")
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


def cmd_generate(args: argparse.Namespace) -> int:
    from defectforge.cluster import resolve_device
    from defectforge.config import parse_override
    from defectforge.errors import ConfigError, DataError
    from defectforge.generate import GenerationPlan, sample_pairs, write_pairs
    from defectforge.methods.base import (
        GeneratorContext,
        check_checkpoint_sampling,
        checkpoint_sampling,
        load_generator,
        read_checkpoint_meta,
    )
    from defectforge.paths import claim_output

    # Everything that can be known without the model is checked first, in seconds, so a bad
    # argument never costs a model load or a sampling run.
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--max-attempts", args.max_attempts),
                        ("--steps", args.steps)):
        at_least(flag, value, 1)
    meta = read_checkpoint_meta(args.checkpoint)  # every field checked, naming config.json
    defects = [d.strip() for d in args.defects.split(",") if d.strip()] if args.defects else None
    GenerationPlan.balanced(GeneratorContext.from_json(meta["context"]), args.n, products(args), defects)
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
    plan = GenerationPlan.balanced(gen.context, args.n, products(args), defects)
    from defectforge.generate import ConditionSource

    source = ConditionSource.for_generator(gen, args.data)
    shown = f"{options.sampler}, {options.steps or 'all'} steps" + "".join(
        f", {k}={v}" for k, v in {**options.method, **options.guidance}.items())
    print(f"[generate] {args.n} pairs from {args.checkpoint} ({gen.method_name()}, {device}) seed {args.seed}; "
          f"sampling: {shown}", flush=True)
    rows, stats = sample_pairs(gen, plan, args.seed, args.batch_size, reject_empty=not args.keep_empty,
                               max_attempts=args.max_attempts, source=source, options=options)
    if not args.keep_empty and stats["still_empty"]:
        # Still without a pixel of their own defect after --max-attempts draws: not written (a
        # mislabelled pair would poison a training set; ``data check`` refuses it).
        from defectforge.generate import has_own_defect

        keep = [bool(has_own_defect(r["mask"][None], [gen.context.class_id(r["product"], r["defect"])])[0])
                for r in rows]
        rows = [r for r, k in zip(rows, keep) if k]
        if not rows:
            from defectforge.errors import CheckpointError

            raise CheckpointError(f"{args.checkpoint}: none of the {len(keep)} pairs holds its defect after "
                                  f"{args.max_attempts} draws (an under-trained generator?); nothing written. "
                                  "--keep-empty writes them anyway")
        print(f"[generate] left out {len(keep) - len(rows)} pair(s) still without their defect after "
              f"{args.max_attempts} draws (--keep-empty keeps them)", flush=True)
    out, _ = claim_output(args.out, "generate", overwrite=args.overwrite)
    out = write_pairs(rows, out, gen.context)
    info = {"checkpoint": str(Path(args.checkpoint).resolve()), "n": args.n, "written": len(rows), "seed": args.seed,
            "sampling": options.to_json(), **stats}
    (out / "generation.json").write_text(json.dumps(info, indent=2))
    print(f"[generate] wrote {len(rows)} pairs to {out} (redrawn masks without their defect: "
          f"{stats['redrawn']}, still without: {stats['still_empty']})")
    return 0
