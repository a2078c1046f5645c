"""Reporting of an evaluation: JSON summary, printed table, sample grid, MLflow run.

Why one module: the CLI, ``jobs/evaluate.py`` and sweeps all read the same summary dict, and the
engineer comparing checkpoints in the MLflow UI relies on the same metric keys everywhere:

* ``<metric>`` overall, ``<product>/<metric>`` per product, ``<product>/<defect>/<metric>`` per
  defect type, where ``<metric>`` carries the extractor's name (``fid_randfeat``; ``fid`` only
  with the standard Inception weights); the defect-quality metrics (``mask_area_ratio``,
  ``visibility_contrast_ratio``, ``visibility_hf_ratio``, ``memorisation_ratio``, ...) follow the
  same scheme;
* segmentation: ``<product>/seg_real_<m>``, ``<product>/seg_mixed_<m>`` (real + synthetic),
  ``<product>/seg_gain_<m>`` and their ``..._std``; the same without the product prefix are means
  over products.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SEG_KEYS = {"real": "seg_real", "real+synthetic": "seg_mixed", "gain": "seg_gain"}
TABLE_SEG_METRIC = "pixel_auroc"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Every finite number of the summary under its MLflow key (see the module docstring)."""
    out: dict[str, float] = {}
    for k, v in summary.get("overall", {}).items():
        if _finite(v):
            out[k] = float(v)
    for product, block in summary.get("products", {}).items():
        for k, v in block.get("metrics", {}).items():
            if _finite(v):
                out[f"{product}/{k}"] = float(v)
        for defect, metrics in block.get("defects", {}).items():
            for k, v in metrics.items():
                if _finite(v):
                    out[f"{product}/{defect}/{k}"] = float(v)
        seg = block.get("segmentation")
        if seg:
            for cond, prefix in SEG_KEYS.items():
                for m, ms in seg[cond].items():
                    for stat, suffix in (("mean", ""), ("std", "_std")):
                        if _finite(ms.get(stat)):
                            out[f"{product}/{prefix}_{m}{suffix}"] = float(ms[stat])
    for k, v in summary.get("segmentation", {}).items():
        if _finite(v):
            out[k] = float(v)
    return out


def format_table(summary: dict[str, Any]) -> str:
    """Per-product table: fidelity, diversity, masks, defect quality, downstream segmentation
    (real / +syn / gain)."""
    names = summary["metric_names"]
    cols = [names["fid"], names["kid"], names["is"], names["lpips"], names["ic_lpips"], "mask_empty_rate",
            "mask_area_ratio", "visibility_contrast_ratio", "visibility_hf_ratio", "memorisation_ratio"]
    head = ["product", "n"] + cols + [f"seg_{TABLE_SEG_METRIC} real", "real+syn", "gain ± std"]
    rows = []
    for product, block in list(summary["products"].items()) + [("overall", {"metrics": summary["overall"]})]:
        m = block["metrics"]
        row = [product, str(int(m.get("n_generated", 0)))] + [_fmt(m.get(c)) for c in cols]
        seg = block.get("segmentation")
        if seg:
            g = seg["gain"][TABLE_SEG_METRIC]
            row += [_fmt(seg["real"][TABLE_SEG_METRIC]["mean"]), _fmt(seg["real+synthetic"][TABLE_SEG_METRIC]["mean"]),
                    f"{_fmt(g['mean'], sign=True)} ± {_fmt(g['std'])}"]
        elif product == "overall" and f"seg_gain_{TABLE_SEG_METRIC}" in summary.get("segmentation", {}):
            s = summary["segmentation"]
            row += [_fmt(s.get(f"seg_real_{TABLE_SEG_METRIC}")), _fmt(s.get(f"seg_mixed_{TABLE_SEG_METRIC}")),
                    f"{_fmt(s.get(f'seg_gain_{TABLE_SEG_METRIC}'), sign=True)} ± "
                    f"{_fmt(s.get(f'seg_gain_{TABLE_SEG_METRIC}_std'))}"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(value: Any, sign: bool = False) -> str:
    if not _finite(value):
        return "nan" if value is not None else "-"
    v = float(value)
    text = f"{v:+.4f}" if sign else (f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}")
    return text


# ----------------------------------------------------------------------------------- sample grid
def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with its defect pixels tinted red (any class id > 0)."""
    out = image.astype(np.float32).copy()
    sel = mask > 0
    out[sel] = (1 - alpha) * out[sel] + alpha * np.array([255.0, 0.0, 0.0])
    return out.clip(0, 255).astype(np.uint8)


def sample_grid(generated: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]],
                real: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]], path: str | Path,
                per_row: int = 4, cell: int = 96) -> Path:
    """One row per (product, defect): ``per_row`` generated pairs (mask overlay), a gap, real ones."""
    keys = sorted(generated)
    if not keys:
        raise ValueError("sample grid: no generated pairs")
    gap = cell // 4
    width = 2 * per_row * cell + gap
    canvas = Image.new("RGB", (width, len(keys) * cell), (255, 255, 255))
    for r, key in enumerate(keys):
        for side, pairs in enumerate((generated.get(key, []), real.get(key, []))):
            for c, (img, mask) in enumerate(pairs[:per_row]):
                tile = Image.fromarray(overlay(np.asarray(img), np.asarray(mask))).resize((cell, cell))
                canvas.paste(tile, (side * (per_row * cell + gap) + c * cell, r * cell))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


# --------------------------------------------------------------------------------------- outputs
def write_summary(summary: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, sort_keys=False, default=_json_default))
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def log_to_mlflow(cfg_dict: dict[str, Any], summary: dict[str, Any], run_root: str | Path, uri: str | None,
                  experiment: str, run_name: str, artifacts: dict[str, Path], timeout_s: float = 10.0,
                  tags: dict[str, str] | None = None) -> str:
    """One MLflow evaluation run: config params, flat metrics, summary/table/grid/Parquet artifacts."""
    import mlflow

    from defectforge import tracking

    resolved = tracking.setup(uri, run_root, experiment, timeout_s)
    all_tags = {"defectforge.kind": "evaluate", "defectforge.extractor": summary["extractor"]}
    all_tags.update(tags or {})
    with tracking.start_run(resolved, experiment, cfg_dict, run_name, tags=all_tags) as run:
        metrics = flat_metrics(summary)
        items = list(metrics.items())
        for i in range(0, len(items), 500):
            mlflow.log_metrics(dict(items[i:i + 500]))
        for name, path in artifacts.items():
            if path.is_dir():
                mlflow.log_artifacts(str(path), name)
            elif path.is_file():
                mlflow.log_artifact(str(path))
        return run.info.run_id


def log_summary_to_run(uri: str, run_id: str, summary: dict[str, Any], step: int = 0) -> None:
    """Log an evaluation summary into an existing run (a sweep trial's child run): flat metrics,
    the sample grid, the table and the summary JSON."""
    import json

    import mlflow

    from defectforge.tracking import log_metrics

    log_metrics(uri, run_id, flat_metrics(summary), step=step)
    client = mlflow.MlflowClient(uri)
    folder = Path(summary["artifacts"]["dir"]) / "artifacts"
    for name in ("sample_grid.png", "table.txt"):
        if (folder / name).is_file():
            client.log_artifact(run_id, str(folder / name), "evaluation")
    client.log_text(run_id, json.dumps(summary, indent=2, default=str), "evaluation/summary.json")
