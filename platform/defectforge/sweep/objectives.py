"""Sweep objectives: which summary numbers a sweep optimises, and the Pareto front of several.

``sweep.objective`` is either one metric (``seg_gain``) or a comma-separated list of
``metric:mode`` pairs (``fid_randfeat:min,lpips:max``) for a multi-objective sweep, the
fidelity-vs-diversity trade-off the papers tabulate. ``sweep.mode`` is the mode of a single
objective. Metric names are keys of the evaluation summary's ``objectives`` section (see
``evaluate/run.py``); an unknown name fails before any trial starts when the summary is known,
and otherwise when the first trial reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from defectforge.config import ConfigError


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "max" | "min"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


def default_objective(cfg: Any) -> str:
    """The downstream segmentation gain when the evaluation trains segmenters (the number the
    product exists for), else KID (unbiased on small sets, unlike FID) to be minimised."""
    if cfg.evaluation.segmentation:
        return "seg_gain"
    from defectforge.evaluate.metrics import metric_name

    extractor = "inception" if cfg.evaluation.feature_extractor == "standard" else cfg.evaluation.feature_extractor
    return f"{metric_name('kid', extractor)}:min"


def parse_objectives(text: str, default_mode: str = "max") -> list[Objective]:
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        metric, _, mode = part.partition(":")
        mode = mode or default_mode
        if mode not in ("max", "min"):
            raise ConfigError(f"sweep.objective: mode of {metric!r} must be max or min, not {mode!r}")
        out.append(Objective(metric.strip(), mode))
    if not out:
        raise ConfigError("sweep.objective: no objective given (e.g. seg_gain or fid_randfeat:min,lpips:max)")
    if len({o.metric for o in out}) != len(out):
        raise ConfigError(f"sweep.objective: a metric is listed twice in {text!r}")
    return out


def dominates(a: dict[str, float], b: dict[str, float], objectives: list[Objective]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and strictly better in one."""
    at_least = all(not o.better(b[o.metric], a[o.metric]) for o in objectives)
    strictly = any(o.better(a[o.metric], b[o.metric]) for o in objectives)
    return at_least and strictly


def pareto_front(rows: list[dict[str, Any]], objectives: list[Objective]) -> list[dict[str, Any]]:
    """The rows no other row dominates (rows with a missing or NaN objective are left out)."""
    import math

    valid = [r for r in rows if all(isinstance(r.get(o.metric), (int, float)) and math.isfinite(r[o.metric])
                                    for o in objectives)]
    return [r for r in valid if not any(dominates(o_, r, objectives) for o_ in valid if o_ is not r)]


def best_row(rows: list[dict[str, Any]], objective: Objective) -> dict[str, Any] | None:
    import math

    valid = [r for r in rows
             if isinstance(r.get(objective.metric), (int, float)) and math.isfinite(r[objective.metric])]
    if not valid:
        return None
    return max(valid, key=lambda r: r[objective.metric] if objective.mode == "max" else -r[objective.metric])


def objective_values(summary: dict[str, Any]) -> dict[str, float]:
    """Flat objective names from an evaluation summary.

    ``overall`` metrics by their names (``fid_randfeat``, ``kid_randfeat``, ``lpips_randnet``...),
    the segmentation numbers by theirs (``seg_gain_pixel_ap``, ``seg_real_pixel_auroc``...), and
    ``seg_gain``: the pixel-AP gain of real + synthetic over real only, the default objective.
    """
    out: dict[str, float] = {}
    for section in ("overall", "segmentation"):
        for k, v in (summary.get(section) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    if "seg_gain_pixel_ap" in out:
        out["seg_gain"] = out["seg_gain_pixel_ap"]
    return out
