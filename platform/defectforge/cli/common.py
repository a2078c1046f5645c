"""What every command shares: the config flags (``--method --preset --config key=value``),
their resolution into a validated config, ``--product/--products`` and small flag checks."""

from __future__ import annotations

import argparse
from typing import Any


def config_args(p: argparse.ArgumentParser, method_default: str | None = "defect-gen") -> None:
    p.add_argument("--method", default=method_default, help="generator to use (default: %(default)s)")
    p.add_argument("--preset", choices=("tiny", "laptop", "paper"), default=None,
                   help="tiny = seconds-scale test sizes (default); laptop = meaningful output on 2 CPUs "
                        "in minutes; paper = the papers' settings (GPU)")
    p.add_argument("--config", metavar="FILE", help="YAML file refining the preset")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides applied last, e.g. train.steps=500 method.u=300")


def resolve(args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    from defectforge.config import resolve_config

    return resolve_config(method=args.method, preset=args.preset, config_file=args.config,
                          overrides=args.overrides, extra=extra)


def products(args: argparse.Namespace) -> list[str] | None:
    if getattr(args, "product", None):
        return [args.product]
    if getattr(args, "products", None):
        return [p.strip() for p in args.products.split(",") if p.strip()]
    return None


def at_least(flag: str, value: int | None, minimum: int) -> None:
    from defectforge.errors import ConfigError

    if value is not None and value < minimum:
        raise ConfigError(f"{flag}: must be at least {minimum}, got {value}")
