"""``ray job submit -- python jobs/evaluate.py (--checkpoint DIR | --generated DIR) --data PATH ...``

Thin entry point: the same arguments and code path as ``defectforge evaluate``
(``defectforge.evaluate.run``): prints the summary table and writes the JSON summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    from defectforge.evaluate.run import add_evaluate_command

    parser = argparse.ArgumentParser(prog="jobs/evaluate.py")
    sub = parser.add_subparsers(dest="command", required=True)
    add_evaluate_command(sub)
    return parser.parse_args(["evaluate", *(sys.argv[1:] if input_args is None else input_args)])


def main(input_args: list[str] | None = None) -> int:
    from defectforge.cli import run_reporting_user_errors

    args = parse_args(input_args)
    return run_reporting_user_errors(lambda: args.func(args))


if __name__ == "__main__":
    # Under `ray job submit --working-dir .` without an installed package, import from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    sys.exit(main())
