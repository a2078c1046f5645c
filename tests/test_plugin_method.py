"""A new method is one file (+ one search space) and nothing else (issue 11, acceptance 2).

The test writes a toy method into a temporary plugin folder named by ``DEFECTFORGE_PLUGINS`` and
runs, unchanged, what a user would: the conformance suite (``tests/generators``), ``defectforge
train`` (its own stage learning rate and rows, through the shared loop on Ray Train), ``defectforge
sweep`` (its space beside its module), ``defectforge generate`` and ``defectforge evaluate`` (Ray
Data actors import the plugin too). No weights folder exists, so the stand-in metrics are used and
said so (acceptance 7's policy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]

TOY = '''"""Toy plugin method: one learned colour per (product, defect type), painted as a disc."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from defectforge.config import MethodConfigBase
from defectforge.methods.base import GeneratedBatch, Generator, Stage
from defectforge.methods.registry import register


class ToyBlobConfig(MethodConfigBase):
    name: Literal["toy-blob"] = "toy-blob"
    radius: float = Field(8.0, gt=0, le=32, json_schema_extra={"sampling_time": True})
    stage_lr: float = Field(0.05, gt=0)


class Colours(nn.Module):
    def __init__(self, n_products: int, n_classes: int) -> None:
        super().__init__()
        self.rgb = nn.Parameter(torch.zeros(n_products, n_classes + 1, 3))
        self.register_buffer("seen_defective", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen_good", torch.zeros((), dtype=torch.long))


@register
class ToyBlob(Generator):
    config_class = ToyBlobConfig
    requires_normal_images = True

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        self.colours = Colours(len(context.products), context.max_classes)

    def stages(self):
        return [Stage("colour", ("colours",), rows="defective", lr=self.config.stage_lr)]

    def trainable_modules(self):
        return {"colours": self.colours}

    def training_step(self, batch, stage):
        with torch.no_grad():
            self.colours.seen_defective += (batch["defect"] > 0).sum()
            self.colours.seen_good += (batch["defect"] == 0).sum()
        target = self.colours.rgb[batch["product"][:, None, None], batch["mask"]].permute(0, 3, 1, 2)
        inside = (batch["mask"] > 0).unsqueeze(1).float()
        loss = ((batch["image"] - target) ** 2 * inside).sum() / inside.sum().clamp(min=1) / 3
        return {"loss": loss}

    def sample(self, n, conditions, seed, options=None):
        cfg = self.sampling_config(options or self.default_sampling)
        rng = np.random.default_rng(seed)
        res = self.context.resolution
        yy, xx = np.mgrid[:res, :res]
        images = np.array(conditions.normal_image[:n], copy=True)
        masks = np.zeros((n, res, res), np.uint8)
        for i in range(n):
            p, d = conditions.product[i], conditions.defect[i]
            cls = self.context.class_id(p, d)
            cy, cx = rng.uniform(cfg.radius, res - cfg.radius, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= cfg.radius ** 2
            rgb = self.colours.rgb[self.context.products.index(p), cls].detach().cpu().numpy()
            images[i][disc] = np.clip((rgb + 1) * 127.5, 0, 255).astype(np.uint8)
            masks[i][disc] = cls
        return GeneratedBatch(images, masks, list(conditions.product[:n]), list(conditions.defect[:n]))
'''

SPACE = """method: toy-blob
parameters:
  method.radius:
    type: float
    low: 4.0
    high: 12.0
"""


def _run(cmd: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{cmd[:4]} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_a_method_in_a_plugin_folder_gets_everything(ray_session, synth_root, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_blob.py").write_text(TOY)
    (plugins / "toy_blob.yaml").write_text(SPACE)
    env = {**os.environ, "DEFECTFORGE_PLUGINS": str(plugins), "PYTHONUNBUFFERED": "1",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("DEFECTFORGE_WEIGHTS", None)
    cli = [sys.executable, "-m", "defectforge.cli"]

    # 1. The whole conformance suite, parametrised over the registry, picks the plugin up.
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/generators",
                 "-k", "toy-blob", "-rA"], env)
    passed = [ln for ln in proc.stdout.splitlines() if ln.startswith("PASSED") and "toy-blob" in ln]
    assert len(passed) >= 5 and "failed" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]

    # 2. The shared loop trains it with the stage's own lr (train.lr is ~0) and rows (defective
    #    only, although defect-free rows are in the training data).
    common = ["--data", str(synth_root), "--product", "fabric"]
    _run([*cli, "train", "--method", "toy-blob", *common, "--out", str(tmp_path / "runs"), "--name", "t",
          "--no-mlflow", "data.train_on_good=true", "train.lr=1e-12", "train.steps=30", "train.batch_size=8",
          "train.warmup_steps=0", "train.ema_decay=null", "train.scaling.num_workers=1"], env)
    ckpt = tmp_path / "runs" / "t" / "generator"
    weights = load_file(str(ckpt / "colours.safetensors"))
    assert int(weights["seen_defective"]) == 30 * 8 and int(weights["seen_good"]) == 0
    classes = json.loads((ckpt / "config.json").read_text())["context"]["classes"]["fabric"]
    learned = weights["rgb"][0, 1:len(classes) + 1]
    assert np.abs(learned).mean() > 0.05, f"the stage's lr did not apply: {learned}"

    # 3. It sweeps over the space beside its module; no weights folder -> stand-in metrics, said once.
    #    (Both trials at once, as the main job runs them on 2 CPUs: one trial's fixed cost less.)
    summary = tmp_path / "sweep.json"
    proc = _run([*cli, "sweep", "--method", "toy-blob", *common[:2], "--products", "fabric", "--trials", "2",
                 "--concurrency", "2", "--run-root", str(tmp_path / "sweep"), "--summary-json", str(summary),
                 "train.steps=10", "train.batch_size=8", "evaluation.n_per_defect=4", "evaluation.seg_steps=10",
                 "evaluation.seg_seeds=1", "sweep.scheduler=none", "evaluation.segmentation=false"], env)
    assert proc.stdout.count("[weights] standard metrics unavailable") == 1, proc.stdout[-3000:]
    study = json.loads(summary.read_text())["studies"][0]
    assert [r["status"] for r in study["trials"]] == ["done", "done"], study["trials"]
    radii = {r["params"]["method.radius"] for r in study["trials"]}
    assert len(radii) == 2 and all(4.0 <= r <= 12.0 for r in radii)
    best = Path(study["best"]["checkpoint_dir"])

    # 4. generate uses the winning trial's radius; 5. evaluate runs its actors with the plugin.
    out = tmp_path / "generated"
    _run([*cli, "generate", "--checkpoint", str(best), "--n", "6", "--out", str(out), "--data", str(synth_root)],
         env)
    info = json.loads((out / "generation.json").read_text())
    assert info["sampling"]["method"]["radius"] == study["best"]["params"]["method.radius"]
    ev = tmp_path / "eval.json"
    _run([*cli, "evaluate", "--checkpoint", str(best), "--data", str(synth_root), "--no-mlflow",
          "--out", str(tmp_path / "eval"), "--summary-json", str(ev), "evaluation.n_per_defect=4",
          "evaluation.segmentation=false", "data.products=[fabric]"], env)
    overall = json.loads(ev.read_text())["overall"]
    assert "kid_randfeat" in overall and "kid" not in overall, sorted(overall)


def test_plugin_env_for_workers_is_resolved_and_leaves_a_jobs_own_keys(tmp_path, monkeypatch):
    """Workers get the plugin folders as absolute paths, after the existing PYTHONPATH (as the
    driver appends them to sys.path); under ``ray job submit --runtime-env-json`` with its own
    ``env_vars`` the driver does not set those keys again (Ray refuses a conflicting merge)."""
    import json as _json

    from defectforge.cluster import plugin_runtime_env

    (tmp_path / "plugins").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEFECTFORGE_PLUGINS", "plugins")
    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = plugin_runtime_env()
    assert env == {"DEFECTFORGE_PLUGINS": str(tmp_path / "plugins"),
                   "PYTHONPATH": os.pathsep.join(["/opt/site", str(tmp_path / "plugins")])}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       _json.dumps({"runtime_env": {"env_vars": {"DEFECTFORGE_PLUGINS": "/job/plugins"}}}))
    assert set(plugin_runtime_env()) == {"PYTHONPATH"}
    monkeypatch.delenv("DEFECTFORGE_PLUGINS")
    assert plugin_runtime_env() == {}
