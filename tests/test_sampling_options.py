"""Sampling options in the protocol (issue 11, item 2): one ``SamplingOptions`` for every method,
recorded in checkpoints, the default of ``generate``, overridable per call, validated up front."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectforge import cli
from defectforge.config import resolve_config
from defectforge.errors import ConfigError
from defectforge.generate import GenerationPlan, sample_pairs
from defectforge.methods.base import (
    Conditions,
    GeneratorContext,
    SamplingOptions,
    build_generator,
    checkpoint_with_sampling,
    load_generator,
    read_checkpoint_meta,
)

CTX = GeneratorContext(("p",), {"p": ("hole", "scratch")}, 64)


def _gen(*overrides: str):
    cfg = resolve_config(method="defect-gen", preset="tiny",
                         overrides=["data.resolution=64", "method.num_train_timesteps=50", *overrides])
    torch.manual_seed(0)
    return build_generator(cfg.method, CTX), cfg


def test_options_round_trip_merge_and_validation():
    opts = SamplingOptions(sampler="ddpm", steps=7, batch_size=2, guidance={}, method={"u": 20})
    assert SamplingOptions.from_json(json.loads(json.dumps(opts.to_json()))) == opts
    merged = opts.merged(steps=3, method={"u": 30})
    assert (merged.sampler, merged.steps, merged.batch_size, merged.method) == ("ddpm", 3, 2, {"u": 30})
    assert opts.merged() == opts  # None keeps every value
    for bad, field in ((dict(sampler="euler"), "sampler"), (dict(steps=0), "steps"),
                       (dict(batch_size=True), "batch_size"), (dict(guidance={"cfg": "x"}), "guidance.cfg")):
        with pytest.raises(ConfigError, match=f"sampling.{field}"):
            SamplingOptions(**bad)


def test_from_config_takes_sampling_and_the_sampling_time_method_fields():
    _, cfg = _gen("method.u=25", "sampling.steps=9", "sampling.sampler=ddpm")
    opts = SamplingOptions.from_config(cfg)
    assert (opts.sampler, opts.steps, opts.method) == ("ddpm", 9, {"u": 25})  # u only: the one sampling-time field


def test_sample_uses_the_options_and_refuses_weight_shaping_fields_and_unknown_guidance():
    gen, _ = _gen("method.u=20")
    cond = Conditions(["p", "p"], ["hole", "scratch"])
    a = gen.sample(2, cond, seed=1, options=SamplingOptions(steps=4, method={"u": 10}))
    b = gen.sample(2, cond, seed=1, options=SamplingOptions(steps=4, method={"u": 40}))
    assert (a.extras["u"], b.extras["u"]) == (10, 40)
    assert not np.array_equal(a.images, b.images)  # u changes which UNet denoises which steps
    with pytest.raises(ConfigError, match="method.small_widths is not a sampling-time field"):
        gen.sample(2, cond, seed=1, options=SamplingOptions(steps=4, method={"small_widths": [8] * 7}))
    with pytest.raises(ConfigError, match="sampling.guidance.cfg: defect-gen has no guidance scales"):
        gen.sample(2, cond, seed=1, options=SamplingOptions(steps=4, guidance={"cfg": 3.0}))
    with pytest.raises(ConfigError, match="method.u"):
        gen.sample(2, cond, seed=1, options=SamplingOptions(steps=4, method={"u": 500}))  # > T = 50


def test_checkpoint_records_options_and_a_trial_copy_carries_its_own(tmp_path):
    gen, _ = _gen("method.u=20")
    ckpt = gen.save_pretrained(tmp_path / "trained", sampling=SamplingOptions(steps=2, method={"u": 20}))
    assert load_generator(ckpt).default_sampling == SamplingOptions(steps=2, method={"u": 20})
    trial = checkpoint_with_sampling(ckpt, tmp_path / "trial" / "generator",
                                     SamplingOptions(sampler="ddim", steps=3, method={"u": 35}))
    loaded = load_generator(trial)  # hashes still verified: the weights are the same files' contents
    assert loaded.default_sampling == SamplingOptions(steps=3, method={"u": 35})
    assert read_checkpoint_meta(trial)["sha256"] == read_checkpoint_meta(ckpt)["sha256"]
    assert load_generator(ckpt).default_sampling.steps == 2  # the source is untouched
    # default sampling == the recorded options, bit for bit
    cond = Conditions(["p"], ["hole"])
    np.testing.assert_array_equal(loaded.sample(1, cond, seed=4).images,
                                  loaded.sample(1, cond, seed=4,
                                                options=SamplingOptions(steps=3, method={"u": 35})).images)


def test_generate_uses_the_checkpoints_options_unless_told_otherwise(tmp_path, capsys):
    """Issue 11 acceptance 1: ``generate`` on a swept checkpoint samples with the trial's options,
    prints progress, and the user's --steps / method.u go on top."""
    gen, _ = _gen("method.u=20")
    trained = gen.save_pretrained(tmp_path / "trained", sampling=SamplingOptions(steps=50, method={"u": 20}))
    trial = checkpoint_with_sampling(trained, tmp_path / "trial", SamplingOptions(steps=3, method={"u": 35}))

    assert cli.main(["generate", "--checkpoint", str(trial), "--n", "4", "--out", str(tmp_path / "g1"),
                     "--device", "cpu", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "sampling: ddim, 3 steps, u=35" in out
    assert "4/4 pairs" in out and "pairs/s" in out and "s left" in out
    info = json.loads((tmp_path / "g1" / "generation.json").read_text())
    assert info["sampling"] == SamplingOptions(steps=3, method={"u": 35}).to_json()
    # the written pairs are what sample_pairs gives with exactly those options
    loaded = load_generator(trial)
    plan = GenerationPlan.balanced(loaded.context, 4, None, None)
    rows, _ = sample_pairs(loaded, plan, 0, 2, progress=False, options=SamplingOptions(steps=3, method={"u": 35}))
    from defectforge.data.arrow import read_parquet

    written = sorted(read_parquet(tmp_path / "g1" / "generated.parquet"), key=lambda r: r["id"])
    for r, w in zip(rows, written):
        np.testing.assert_array_equal(r["image"], w["image"])

    assert cli.main(["generate", "--checkpoint", str(trial), "--n", "2", "--out", str(tmp_path / "g2"),
                     "--device", "cpu", "--steps", "2", "method.u=10"]) == 0
    info = json.loads((tmp_path / "g2" / "generation.json").read_text())
    assert (info["sampling"]["steps"], info["sampling"]["method"]) == (2, {"u": 10})


def test_a_mask_without_the_requested_defects_class_is_redrawn_and_counted():
    """A pair labelled ``scratch`` whose mask holds only ``hole`` pixels is as useless as an empty
    one: it is redrawn, and counted when it stays so (``generate`` then leaves it out)."""
    from defectforge.generate import GenerationPlan, has_own_defect, sample_pairs
    from defectforge.methods.base import GeneratedBatch, GeneratorContext

    ctx = GeneratorContext(("p",), {"p": ("hole", "scratch")}, 8)

    class WrongClassFirst:  # draws the hole class for every request on its first call only
        requires_normal_images = requires_masks = False
        context, default_sampling, calls = ctx, SamplingOptions(), []

        def sampling_config(self, options):
            return None

        def sample(self, n, cond, seed, options=None):
            self.calls.append(list(cond.defect))
            masks = np.zeros((n, 8, 8), np.uint8)
            for i, d in enumerate(cond.defect):
                masks[i, 2:4, 2:4] = 1 if len(self.calls) == 1 else ctx.class_id("p", d)
            return GeneratedBatch(np.zeros((n, 8, 8, 3), np.uint8), masks, list(cond.product), list(cond.defect))

    gen = WrongClassFirst()
    rows, stats = sample_pairs(gen, GenerationPlan(["p"] * 4, ["hole", "scratch"] * 2), seed=0, batch_size=4,
                               progress=False)
    assert gen.calls == [["hole", "scratch", "hole", "scratch"], ["scratch", "scratch"]]
    assert stats == {"redrawn": 2, "still_empty": 0}
    assert all(has_own_defect(r["mask"][None], [ctx.class_id("p", r["defect"])])[0] for r in rows)
    gen.calls.clear()  # the next call is a first one again (wrong class), and no redraw is allowed
    _, stats = sample_pairs(gen, GenerationPlan(["p"] * 4, ["hole", "scratch"] * 2), seed=0, batch_size=4,
                            progress=False, max_attempts=1)
    assert stats == {"redrawn": 0, "still_empty": 2}


def test_evaluate_takes_a_named_override_even_when_it_equals_the_preset(tmp_path):
    """``defectforge evaluate method.u=200 ...`` on a checkpoint recorded with u=20: the user named
    u, so 200 applies even though it is also the preset's value (it used to be taken for "not
    set" and the checkpoint's 20 won); what is not named or changed stays the checkpoint's."""
    from defectforge.evaluate.run import explicit_sampling

    gen, _ = _gen("method.u=20")
    ckpt = gen.save_pretrained(tmp_path / "trained", sampling=SamplingOptions(steps=2, method={"u": 20}))
    base = resolve_config(method="defect-gen", preset="tiny")
    assert base.method.u == 200
    assert explicit_sampling(base, base, ckpt).method["u"] == 20  # nothing said: the checkpoint's
    assert explicit_sampling(base, base, ckpt, {"method.u"}).method["u"] == 200  # named: the user's
    named = explicit_sampling(base, base, ckpt, {"sampling.steps"})
    assert named.steps == base.sampling.steps and named.method["u"] == 20
