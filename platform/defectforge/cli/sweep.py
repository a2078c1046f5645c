"""``defectforge sweep``, ``jobs/sweep.py`` and the main job ``jobs/sweep_defectgen.py``: one handling of sweep flags.

Flags become config values (``--trials`` -> ``sweep.num_trials`` ...); trailing ``key=value``
overrides come last. The embedded default (no ``--data``) sweeps the built-in synthetic dataset's
first product with CPU-sized settings, so the main job finishes in minutes on a 2-CPU laptop.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from defectforge.cli.common import config_args
from defectforge.sweep.space import REPO_SPACES

# The main job's embedded default: the laptop preset on the built-in synthetic data's first product,
# 8 trials over u, sampling steps and the receptive field (3 trainings, the rest reuse a trained
# generator), two trials at a time so both cores work. Sized by measurement to finish in about
# 12 minutes with the venv set-up on a fresh clone (README).
EMBEDDED_DEFAULT = {
    "data": {"products": ["fabric"]},
    "evaluation": {"n_per_defect": 16, "seg_seeds": 2, "seg_steps": 100},
    # Every trial of the laptop sweep should end with a model to compare in MLflow, so no early
    # stopping here; cluster sweeps keep sweep.scheduler=asha (the default).
    "sweep": {"num_trials": 8, "scheduler": "none", "max_concurrent": 2,
              "space": str(REPO_SPACES / "defect_gen_laptop.yaml")},
}
EMBEDDED_PRESET = "laptop"


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="sweep a method's hyper-parameters (Ray Tune + Optuna, MLflow runs)",
                       description="Sweep hyper-parameters over search_spaces/<method>.yaml: each trial trains "
                                   "(Ray Train), evaluates and reports the objective; the best generator is "
                                   "registered in MLflow with the alias 'best'. Re-running with the same "
                                   "--name and storage resumes an interrupted sweep.")
    config_args(p)
    add_sweep_arguments(p)
    p.set_defaults(func=lambda args: run_sweep_command(args, method=args.method))


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset root in MVTec layout (default: built-in synthetic)")
    p.add_argument("--products", help="comma-separated products")
    p.add_argument("--mode", choices=("per-product", "multi-product"), default=None)
    p.add_argument("--space", help="search-space YAML (default: search_spaces/<method>_<preset>.yaml if it exists, "
                                   "else search_spaces/<method>.yaml)")
    p.add_argument("--trials", type=int, default=None, help="trials per study")
    p.add_argument("--concurrency", type=int, default=None, help="max concurrent trials")
    p.add_argument("--objective", help="metric or metric:mode,metric:mode (multi-objective)")
    p.add_argument("--name", help="sweep name (same name + storage resumes)")
    p.add_argument("--storage-path", help="Tune/Train storage folder (on a multi-node cluster a shared mount "
                                          "named in DEFECTFORGE_SHARED_FS; default <run-root>/sweeps)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--run-root", default=None, help="runs, data and mlflow.db (default: runs)")
    p.add_argument("--summary-json", help="write the sweep summary as JSON")


def _extra(args: argparse.Namespace, embedded_default: bool) -> dict[str, Any]:
    from defectforge.config import deep_merge

    extra: dict[str, Any] = deep_merge(EMBEDDED_DEFAULT, {}) if embedded_default and not args.data else {}
    flags: dict[str, Any] = {"data": {}, "train": {}, "sweep": {}, "tracking": {}}
    if args.data:
        flags["data"]["path"] = args.data
    if args.products:
        flags["data"]["products"] = [p.strip() for p in args.products.split(",") if p.strip()]
    if args.mode:
        flags["train"]["mode"] = args.mode
    for flag, key in (("space", "space"), ("trials", "num_trials"), ("concurrency", "max_concurrent"),
                      ("objective", "objective"), ("name", "name"), ("storage_path", "storage_path")):
        if getattr(args, flag) is not None:
            flags["sweep"][key] = getattr(args, flag)
    if args.tracking_uri:
        flags["tracking"]["uri"] = args.tracking_uri
    if args.run_root:
        flags["tracking"]["run_root"] = args.run_root
    return deep_merge(extra, {k: v for k, v in flags.items() if v})


def swept_overrides(cfg: Any, overrides: list[str] | None) -> list[str]:
    """One line per command-line override of a field the search space sweeps or fixes.

    Why: each trial's config is the base config with the trial's sampled values applied last, so
    ``sampling.steps=4`` on the command line of a sweep whose space sweeps ``sampling.steps`` is
    replaced in every trial; a user who meant to fix it should hear so, not find 25 steps later."""
    from defectforge.sweep.space import load_space

    space = load_space(cfg.sweep.space or cfg.method.name, preset=cfg.preset)
    if space.method != cfg.method.name:
        return []  # the sweep refuses this space, naming both methods
    keys = [text.split("=", 1)[0].strip() for text in (overrides or []) if "=" in text]
    lines: dict[str, str] = {}  # by parameter: a section and a field under it name it once
    for key in dict.fromkeys(keys):
        # the field itself, or fields under a section given whole (sampling={steps: 4})
        for path, spec in space.parameters.items():
            if path != key and not path.startswith(key + "."):
                continue
            if spec.already_in(cfg):
                continue  # set to the value the space fixes anyway
            how = f"fixed to {spec.value!r} by" if spec.fixed else "swept by"
            where = " where its condition holds" if spec.when else ""
            lines[path] = (f"[sweep] {path} (command line) is {how} the search space {space.label}: each trial's "
                           f"value replaces it{where}; to set it yourself, give --space a space without {path}")
    return list(lines.values())


def run_sweep_command(args: argparse.Namespace, method: str, embedded_default: bool = False) -> int:
    from defectforge.config import resolve_config

    # A ConfigError propagates: run_reporting_user_errors prints it to stderr and exits 2.
    preset = getattr(args, "preset", None)
    if preset is None and embedded_default and not args.data and not args.config:
        preset = EMBEDDED_PRESET
    cfg = resolve_config(method=method, preset=preset, config_file=args.config,
                         overrides=args.overrides, extra=_extra(args, embedded_default))
    for line in swept_overrides(cfg, args.overrides):
        print(line, flush=True)
    from defectforge.sweep.run import results_table, sweep

    summary = sweep(cfg, summary_json=args.summary_json)
    print("\n" + results_table(summary))
    for study in summary["studies"]:
        best = study.get("best")
        if best:
            print(f"\nbest of {study['name']}: trial {best.get('trial_id')}  "
                  + "  ".join(f"{o['metric']}={best[o['metric']]:.4g}" for o in summary["objectives"]))
            print("  config: " + json.dumps(best["params"]))
            print(f"  checkpoint: {best['checkpoint_dir']}")
            if study.get("registered_model"):
                print(f"  registered: {study['registered_model']['uri']}")
        elif study.get("pareto_front") is not None:
            print(f"\nPareto front of {study['name']}: {len(study['pareto_front'])} trial(s)")
            for r in study["pareto_front"]:
                print("  " + json.dumps(r["params"]) + "  " +
                      "  ".join(f"{o['metric']}={r[o['metric']]:.4g}" for o in summary["objectives"]))
        else:
            print(f"\n{study['name']}: no trial finished")
    print(f"\nMLflow: {summary['tracking_uri']} (experiment {summary['experiment']}, parent run "
          f"{summary['parent_run_id']})")
    print(f"open the UI: {summary['ui_command']}")
    done = sum(r["status"] == "done" for s in summary["studies"] for r in s["trials"])
    return 0 if done else 1
