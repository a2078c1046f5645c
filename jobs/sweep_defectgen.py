"""Main job: sweep Defect-Gen's hyper-parameters with Ray Tune + Optuna, log to MLflow.

With no arguments it is the README's embedded default, sized for a 2-CPU laptop: it writes the
built-in synthetic dataset if needed, sweeps 8 laptop-preset trials on one product,
prints the results table, the best config, where the MLflow database is and how to open the UI.

    python jobs/sweep_defectgen.py
    ray job submit --working-dir . -- python jobs/sweep_defectgen.py --trials 8
    python jobs/sweep_defectgen.py --data /data/mvtec --products bottle,cable --preset paper \
        --storage-path /mnt/shared/defectforge/sweeps --tracking-uri http://head:5000

Thin on purpose: argument parsing here, everything else in ``defectforge.sweep``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from defectforge.cli.sweep import add_sweep_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=("tiny", "laptop", "paper"), default=None,
                   help="tiny (tests), laptop (2 CPUs) or paper (GPU)")
    p.add_argument("--config", help="YAML file refining the preset")
    add_sweep_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, applied last")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from defectforge.cli import run_reporting_user_errors
    from defectforge.cli.sweep import run_sweep_command

    args = parse_args(argv)
    return run_reporting_user_errors(lambda: run_sweep_command(args, method="defect-gen", embedded_default=True))


if __name__ == "__main__":
    # Under `ray job submit --working-dir .` without an installed package, import from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    sys.exit(main())
