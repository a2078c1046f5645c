"""``defectforge data synth`` and ``defectforge data check``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> int:
    from defectforge.data.synth import check_synth_args, write_synthetic
    from defectforge.paths import claim_output

    check_synth_args(args.size, args.products)  # before the folder is claimed
    # Never into a folder defectforge did not make (it may be a real dataset: its README and
    # metadata.csv would be overwritten); an earlier synth output only with --overwrite.
    claim_output(args.out, "synth", overwrite=args.overwrite)
    t0 = time.perf_counter()
    out = write_synthetic(args.out, seed=args.seed, size=args.size, products=args.products)
    n = sum(1 for _ in Path(out).rglob("*.png"))
    print(f"wrote the synthetic dataset to {out}: {n} PNG files in {time.perf_counter() - t0:.1f} s "
          f"(seed {args.seed}, {args.size} px, {args.products} product(s))")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from defectforge.data.check import check_dataset

    products = [p.strip() for p in args.products.split(",")] if args.products else None
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 1.0:
            last[0] = now
            print(f"\rchecking {done}/{total} samples", end="" if done < total else "\n", file=sys.stderr, flush=True)

    report = check_dataset(args.path, products=products, on_bad_sample=args.on_bad_sample, progress=progress)
    print(report.format())
    if report.bad and args.on_bad_sample == "error":
        print(f"error: {len(report.bad)} problem(s) found; fix them or pass --on-bad-sample skip", file=sys.stderr)
        return 1
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="make and validate datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("synth", help="write the built-in procedural dataset in MVTec layout",
                       description="Write a deterministic synthetic dataset (procedural textures and objects x "
                                   "defect types with exact masks) in MVTec layout. The same seed gives "
                                   "byte-identical files.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, metavar="PX", help="image side in pixels (default 128)")
    p.add_argument("--products", type=int, default=2, metavar="N", help="number of products, 1-4 (default 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out whole when it holds an earlier defectforge output (never a folder "
                        "defectforge did not create)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check", help="validate a dataset folder and print counts",
                       description="Decode every image and mask, print per-product and per-defect counts and "
                                   "list every bad sample with its path. 'error' (default) exits 1 when "
                                   "anything is wrong; 'skip' exits 0 and says how many were skipped.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--on-bad-sample", choices=("error", "skip"), default="error")
    p.add_argument("--products", help="comma-separated products to check (default: all)")
    p.set_defaults(func=cmd_check)
