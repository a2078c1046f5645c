"""The shared Ray Train loop, exercised in-process (num_workers=0) with a two-stage toy method.

The toy method is deliberately not a real generator: it lets these tests pin the *loop's*
behaviour (stages in order, only the stage's modules change, checkpoints, exact resume, NaN
handling) in seconds. Defect-Gen's own tests cover a real method through the same loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import Field
from torch import nn

from defectforge.config import MethodConfigBase, resolve_config
from defectforge.methods import registry
from defectforge.methods.base import Conditions, GeneratedBatch, Generator, Stage, load_generator

CALLS: list[tuple[str, int]] = []
DEFECT_IDS: list[tuple[str, list[int]]] = []
OPTIMIZERS: list[tuple[str, float, str]] = []


class ToyConfig(MethodConfigBase):
    name: Literal["test-toy"] = "test-toy"
    # Fault-injection knobs: they decide when a run fails, not what its weights are, so a run
    # resumed without them counts as the same training (the sampling_time mark, train/reuse.py).
    crash_at_call: int | None = Field(None, json_schema_extra={"sampling_time": True})
    nan_at_call: int | None = Field(None, json_schema_extra={"sampling_time": True})
    # Stage policies (protocol v2): which rows each stage trains on, the mask stage's own rate.
    mask_rows: str = "all"
    image_rows: str = "all"
    mask_lr: float | None = None


@registry.register
class ToyGenerator(Generator):
    """Stage "mask" fits a conv to predict the mask; stage "image" fits another to denoise."""

    config_class = ToyConfig

    def __init__(self, config, context):
        super().__init__(config, context)
        self.mask_net = nn.Conv2d(3, 1, 3, padding=1)
        self.image_net = nn.Conv2d(3, 3, 3, padding=1)

    def stages(self):
        return [Stage("mask", ("mask_net",), rows=self.config.mask_rows, lr=self.config.mask_lr),
                Stage("image", ("image_net",), rows=self.config.image_rows)]

    def configure_optimizer(self, stage, params):
        """Plain SGD, to show the method (not the loop) picks the optimiser; records what it got."""
        OPTIMIZERS.append((stage.name, stage.lr, stage.rows))
        return torch.optim.SGD(params, lr=stage.lr)

    def trainable_modules(self):
        return {"mask_net": self.mask_net, "image_net": self.image_net}

    def training_step(self, batch, stage):
        CALLS.append((stage, len(CALLS)))
        DEFECT_IDS.append((stage, batch["defect"].tolist()))
        n = len(CALLS)
        if self.config.crash_at_call is not None and n == self.config.crash_at_call:
            raise RuntimeError("simulated worker crash")
        x = batch["image"]
        if stage == "mask":
            loss = nn.functional.binary_cross_entropy_with_logits(
                self.mask_net(x)[:, 0], (batch["mask"] > 0).float())
        else:
            noisy = x + 0.1 * torch.randn_like(x)
            loss = nn.functional.mse_loss(self.image_net(noisy), x)
        if self.config.nan_at_call is not None and n >= self.config.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss}

    def sample(self, n, conditions: Conditions, seed, options=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 3, self.context.resolution, self.context.resolution, generator=g) * 2 - 1
        with torch.no_grad():
            img = ((self.image_net(x).clamp(-1, 1) + 1) * 127.5).byte().permute(0, 2, 3, 1).numpy()
            mask = (self.mask_net(x)[:, 0] > 0).byte().numpy()
        return GeneratedBatch(img, mask, list(conditions.product), list(conditions.defect))


def _cfg(synth_root, tmp_path, *overrides):
    return resolve_config(method="test-toy", preset="tiny", overrides=[
        f"data.path={synth_root}", "data.resolution=32", "data.products=[" + _first_product(synth_root) + "]",
        "train.steps=4", "train.checkpoint_every=2", "train.batch_size=4", "train.log_every=1",
        "train.scaling.num_workers=0", f"tracking.run_root={tmp_path}", *overrides])


def _first_product(root):
    from defectforge.data.mvtec import scan_dataset

    return scan_dataset(root).products[0]


def _weights(path):
    from safetensors.torch import load_file

    return {f"{m}.{k}": v for m in ("mask_net", "image_net") for k, v in load_file(f"{path}/{m}.safetensors").items()}


def test_stages_train_in_order_and_checkpoint_loads(ray_session, synth_root, tmp_path):
    from defectforge.train.runner import train

    CALLS.clear()
    cfg = _cfg(synth_root, tmp_path)
    [out] = train(cfg, tmp_path / "out", name="toy", log_to_mlflow=False)
    assert out.ok, out.error
    assert [s for s, _ in CALLS] == ["mask"] * 4 + ["image"] * 4
    assert out.metrics["global_step"] == 8
    gen = load_generator(out.checkpoint)
    batch = gen.sample(2, Conditions(["x", "x"], ["y", "y"]), seed=1)
    assert batch.images.shape == (2, 32, 32, 3) and batch.images.dtype == np.uint8
    # provenance: where these weights came from
    import json

    import defectforge
    from defectforge.train.data import load_training_data
    from defectforge.train.loop import rows_digest

    prov = json.loads((Path(out.checkpoint) / "config.json").read_text())["provenance"]
    assert prov["defectforge_version"] == defectforge.__version__ and prov["method"] == "test-toy"
    assert prov["config"]["train"]["steps"] == 4 and prov["run_name"] == "toy"
    assert prov["training_rows_sha256"] == rows_digest(load_training_data(cfg).rows)


def test_only_the_stage_modules_change(ray_session, synth_root, tmp_path):
    """After stage "mask" (steps 1-4) image_net is still at its init; mask_net moved."""
    from defectforge.train.runner import train

    cfg = _cfg(synth_root, tmp_path, "train.steps=4", "train.checkpoint_every=4", "train.num_to_keep=4",
               "train.ema_decay=null")
    [out] = train(cfg, tmp_path / "out", name="stages", log_to_mlflow=False)
    assert out.ok, out.error
    ckpts = sorted((tmp_path / "out" / "ray" / "stages").glob("checkpoint_*"))
    assert [c.name for c in ckpts] == ["checkpoint_00000004", "checkpoint_00000008"]
    context = load_generator(out.checkpoint).context
    torch.manual_seed(cfg.train.seed)  # the loop seeds the same way before building the model
    init = ToyGenerator(cfg.method, context)
    after_mask = _weights(ckpts[0] / "generator")
    after_all = _weights(ckpts[1] / "generator")
    assert torch.equal(after_mask["image_net.weight"], init.image_net.weight.detach())
    assert not torch.equal(after_mask["mask_net.weight"], init.mask_net.weight.detach())
    assert torch.equal(after_all["mask_net.weight"], after_mask["mask_net.weight"])
    assert not torch.equal(after_all["image_net.weight"], after_mask["image_net.weight"])


def test_resume_after_crash_equals_uninterrupted_run(ray_session, synth_root, tmp_path):
    from defectforge.train.runner import train

    [ref] = train(_cfg(synth_root, tmp_path), tmp_path / "a", name="straight", log_to_mlflow=False)
    assert ref.ok, ref.error

    CALLS.clear()
    crash = _cfg(synth_root, tmp_path, "method.crash_at_call=4")  # dies after the step-2 checkpoint
    [failed] = train(crash, tmp_path / "b", name="resumed", log_to_mlflow=False)
    assert not failed.ok and "simulated worker crash" in failed.error
    first_ckpt = sorted((tmp_path / "b" / "ray" / "resumed").glob("checkpoint_*"))[-1]
    assert first_ckpt.name == "checkpoint_00000002"
    saved = torch.load(first_ckpt / "train_state.pt", weights_only=False)

    CALLS.clear()
    [resumed] = train(_cfg(synth_root, tmp_path), tmp_path / "b", name="resumed", log_to_mlflow=False)
    assert resumed.ok, resumed.error
    # The step count continues: 2 more "mask" steps, then 4 "image" steps; 8 in all.
    assert [s for s, _ in CALLS] == ["mask"] * 2 + ["image"] * 4
    assert resumed.metrics["global_step"] == 8 and saved["global_step"] == 2
    a, b = _weights(ref.checkpoint), _weights(resumed.checkpoint)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # Started again once finished (a sweep trial killed during its evaluation): nothing is trained,
    # the final checkpoint stands.
    CALLS.clear()
    [again] = train(_cfg(synth_root, tmp_path), tmp_path / "b", name="resumed", log_to_mlflow=False)
    assert again.ok, again.error
    assert CALLS == []
    c = _weights(again.checkpoint)
    for key in a:
        assert torch.equal(a[key], c[key]), key


def test_nan_loss_fails_with_a_clear_reason(ray_session, synth_root, tmp_path):
    from defectforge.train.runner import train

    [out] = train(_cfg(synth_root, tmp_path, "method.nan_at_call=2"), tmp_path / "n", name="nan",
                  log_to_mlflow=False)
    assert not out.ok
    assert "NonFiniteLossError" in out.error and "non-finite loss" in out.error


# ------------------------------------------------------------------ protocol v2: stage policies
def test_each_stage_trains_on_its_rows_at_its_rate_with_the_methods_optimizer(ray_session, synth_root, tmp_path):
    from defectforge.train.runner import train

    CALLS.clear(), DEFECT_IDS.clear(), OPTIMIZERS.clear()
    cfg = _cfg(synth_root, tmp_path, "data.train_on_good=true", "method.mask_rows=defective",
               "method.image_rows=good", "method.mask_lr=0.05", "train.lr=0.001")
    [out] = train(cfg, tmp_path / "out", name="rows", log_to_mlflow=False)
    assert out.ok, out.error
    assert OPTIMIZERS == [("mask", 0.05, "defective"), ("image", 0.001, "good")]  # None -> train.lr
    mask_ids = [i for s, ids in DEFECT_IDS if s == "mask" for i in ids]
    image_ids = [i for s, ids in DEFECT_IDS if s == "image" for i in ids]
    assert len(mask_ids) == len(image_ids) == 4 * 4
    assert all(i > 0 for i in mask_ids) and all(i == 0 for i in image_ids)


def test_balanced_rows_are_half_defective_half_good_and_a_missing_kind_is_named():
    from defectforge.errors import DataError
    from defectforge.train.data import StepBatches

    tensors = {"image": torch.zeros(10, 3, 4, 4), "mask": torch.zeros(10, 4, 4, dtype=torch.long),
               "product": torch.zeros(10, dtype=torch.long),
               "defect": torch.tensor([1, 2, 1, 0, 0, 0, 0, 0, 0, 0])}
    batches = StepBatches(tensors, 6, 0, 0, flip=False, rows="balanced", stage="s")
    for step in range(5):
        ids = batches(step, torch.device("cpu"))["defect"].tolist()
        assert all(i > 0 for i in ids[:3]) and all(i == 0 for i in ids[3:])
    only_defects = {**tensors, "defect": torch.ones(10, dtype=torch.long)}
    with pytest.raises(DataError, match="stage 'bg' trains on good rows.*data.train_on_good=true"):
        StepBatches(only_defects, 4, 0, 0, rows="good", stage="bg")
    # "all" draws exactly as before protocol v2 (resumed and older runs see the same batches)
    a = StepBatches(tensors, 4, 3, 0, flip=False)(7, torch.device("cpu"))["defect"]
    rng = np.random.default_rng([3, 0, 7])
    assert a.tolist() == tensors["defect"][torch.from_numpy(rng.choice(10, 4, replace=False))].tolist()


def test_train_stages_trains_only_those_and_takes_the_rest_from_init_from(ray_session, synth_root, tmp_path):
    from defectforge.errors import ConfigError
    from defectforge.train.runner import train

    first_cfg = _cfg(synth_root, tmp_path)
    [first] = train(first_cfg, tmp_path / "out", name="full", log_to_mlflow=False)
    assert first.ok, first.error

    with pytest.raises(ConfigError, match="train.stages skips stage\\(s\\) mask; their modules mask_net"):
        train(_cfg(synth_root, tmp_path, "train.stages=[image]"), tmp_path / "out", name="no-init", log_to_mlflow=False)
    with pytest.raises(ConfigError, match="train.stages: test-toy has no stage 'backbone'; its stages: mask, image"):
        train(_cfg(synth_root, tmp_path, "train.stages=[backbone]"), tmp_path / "out", name="bad", log_to_mlflow=False)
    assert not (tmp_path / "out" / "no-init").exists() and not (tmp_path / "out" / "bad").exists()

    CALLS.clear()
    cfg = _cfg(synth_root, tmp_path, "train.stages=[image]", f"train.init_from={first.checkpoint}")
    [second] = train(cfg, tmp_path / "out", name="image-only", log_to_mlflow=False)
    assert second.ok, second.error
    assert [s for s, _ in CALLS] == ["image"] * 4
    w1, w2 = _weights(first.checkpoint), _weights(second.checkpoint)
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("mask_net."))  # from init_from
    assert not all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("image_net."))  # trained again
