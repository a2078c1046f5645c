"""``defectforge`` command line: data, config, train, generate, evaluate, sweep.

All argparse code lives in this package, one module per command (``data``, ``train``,
``generate``, ``evaluate``, ``sweep``); the layers below it (``config``, ``methods``, ``train``,
``evaluate``, ``sweep``) import nothing from here, so there is no import circle.

Every command that takes a config resolves it the same way: ``--preset`` (tiny | laptop | paper), then
``--config FILE.yaml``, then the command's own flags, then trailing dotted ``key=value``
overrides (``train.lr=3e-4 method.u=300``). The config is validated before anything heavy is
imported or started, so a bad value fails in seconds naming the field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from defectforge.cli.common import config_args, resolve


# --------------------------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = resolve(args, {})
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from defectforge.cli.data import add_data_commands
    from defectforge.cli.evaluate import add_evaluate_command
    from defectforge.cli.generate import add_generate_command
    from defectforge.cli.sweep import add_sweep_command
    from defectforge.cli.train import add_train_command

    parser = argparse.ArgumentParser(
        prog="defectforge",
        description="Few-shot industrial defect-image generation: synthesise and check data, train "
                    "generators on Ray Train, generate image + mask pairs, evaluate them, sweep.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    p = sub.add_parser("config", help="print the resolved configuration (preset + file + overrides)")
    config_args(p)
    p.set_defaults(func=cmd_config)
    add_train_command(sub)
    add_generate_command(sub)
    add_evaluate_command(sub)
    add_sweep_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors exit 2 with one clear line (``run_reporting_user_errors``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_reporting_user_errors(lambda: args.func(args))


def run_job(command: str, argv: list[str] | None = None) -> int:
    """``jobs/<command>.py``: the ``defectforge <command>`` command as a script for ``ray job
    submit`` (same flags, same code path, same exit codes)."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


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

