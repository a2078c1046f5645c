"""Defect-Gen's laptop preset makes defect-like pairs, by the numbers (issue: "a generator is done
when what it makes is defect-like"): trained at its default budget on the built-in synthetic data
through the real training path, then sampled as the evaluation samples (empty masks redrawn).

Per defect type: generated mask mean area within x2 of the real training masks', <= 10 % empty
masks, in-mask contrast ratio >= 0.5 (the defect stands out of its surroundings like a real one),
high-frequency ratio <= 2 (structure, not noise); per product: KID (stand-in features) below the
same config's untrained model. Slow: about 4-8 minutes of one CPU core.
The data is `data synth`'s default (128 px drawn, loaded at the preset's 64 px), as the laptop
main job uses it; drawn at 64 px a scratch is one pixel wide.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.config import resolve_config


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_laptop_preset_makes_defect_like_pairs(ray_session, tmp_path_factory, tmp_path):
    from defectforge.data.synth import write_synthetic
    from defectforge.evaluate.metrics import kid
    from defectforge.evaluate.metrics.extractors import make_extractor
    from defectforge.evaluate.metrics.quality import quality_metrics
    from defectforge.evaluate.run import load_real
    from defectforge.generate import GenerationPlan, sample_pairs
    from defectforge.methods.base import SamplingOptions, build_generator, load_generator
    from defectforge.train.runner import train

    # The built-in dataset as the laptop main job uses it: `data synth` defaults (128 px), loaded
    # at the preset's 64 px. (The session fixture draws at 64 px, where a scratch is one pixel wide.)
    synth_root = write_synthetic(tmp_path_factory.mktemp("synth128") / "data", seed=0, size=128, products=1)
    cfg = resolve_config(method="defect-gen", preset="laptop", overrides=[
        f"data.path={synth_root}", "data.products=[fabric]", f"tracking.run_root={tmp_path}"])
    assert cfg.train.steps == 800 and cfg.method.prediction_type == "sample"  # the default budget
    [outcome] = train(cfg, tmp_path / "out", log_to_mlflow=False)
    assert outcome.ok, outcome.error
    trained = load_generator(outcome.checkpoint)
    torch.manual_seed(cfg.train.seed)
    untrained = build_generator(cfg.method, trained.context).eval()

    real = load_real(cfg, synth_root, ["fabric"], cfg.data.resolution)
    plan = GenerationPlan.balanced(trained.context, 32 * 3)
    options = SamplingOptions.from_config(cfg)  # the laptop preset's DDIM steps and u, for both
    rows, _ = sample_pairs(trained, plan, seed=0, batch_size=32, progress=False, options=options)
    base_rows, _ = sample_pairs(untrained, plan, seed=0, batch_size=32, progress=False, options=options)
    extractor = make_extractor("randfeat")
    test_defects = np.stack([r["image"] for r in real["test"] if r["defect"] != "good"])
    real_feats = extractor.features(test_defects)
    kid_trained = kid(extractor.features(np.stack([r["image"] for r in rows])), real_feats)
    kid_untrained = kid(extractor.features(np.stack([r["image"] for r in base_rows])), real_feats)
    report = {"kid_randfeat": kid_trained, "kid_randfeat_untrained": kid_untrained}
    for defect in trained.context.classes["fabric"]:
        cid = trained.context.class_id("fabric", defect)
        mine = [r for r in rows if r["defect"] == defect]
        train_rows = [r for r in real["few_shot"] if r["defect"] == defect]
        test_rows = [r for r in real["test"] if r["defect"] == defect]
        q = quality_metrics([r["image"] for r in mine], [(r["mask"] == cid).astype(np.uint8) for r in mine],
                            [r["image"] for r in train_rows], [r["mask"] for r in train_rows],
                            [r["image"] for r in train_rows], [r["image"] for r in test_rows])
        report[defect] = {k: round(float(v), 3) for k, v in q.items()}
    print(report)
    for defect in trained.context.classes["fabric"]:
        q = report[defect]
        assert 0.5 <= q["mask_area_ratio"] <= 2.0, (defect, report)
        assert q["mask_empty_rate"] <= 0.10, (defect, report)
        assert q["visibility_contrast_ratio"] >= 0.5, (defect, report)
        assert q["visibility_hf_ratio"] <= 2.0, (defect, report)
    assert kid_trained < kid_untrained, report
