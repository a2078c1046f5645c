"""Evaluation pipeline: streaming FID statistics, end-to-end runs (checkpoint and folder), MLflow, errors.

Sizes are tiny (64 px synthetic data, a few pairs per defect type, randfeat stand-in extractor, a
few segmentation steps); the numbers are checked for presence, names and consistency, not quality.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectforge.config import resolve_config
from defectforge.evaluate.metrics import GaussianStats, MissingWeightsError

SEG_METRICS = ("pixel_auroc", "pixel_ap")
QUALITY_KEYS = ("mask_area_ratio", "mask_empty_rate", "visibility_contrast", "visibility_contrast_real",
                "visibility_contrast_ratio", "visibility_hf", "visibility_hf_real", "visibility_hf_ratio",
                "nn_gray_mad_generated", "nn_gray_mad_real_test", "memorisation_ratio")


def _cfg(synth_root, tmp_path, *overrides, method="crop-paste"):
    return resolve_config(method=method, preset="tiny", overrides=[
        f"data.path={synth_root}", f"tracking.run_root={tmp_path / 'runs'}", "evaluation.feature_extractor=randfeat",
        "evaluation.n_per_defect=4", "evaluation.seg_steps=10", "evaluation.seg_seeds=2", "sampling.batch_size=8",
        *overrides])


# ------------------------------------------------------------------- pipeline vs plain loop
def _plain_loop():
    """``sequential`` of jobs/benchmark.py: the same evaluation work in one process, one batch after another."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("df_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tasks", "driver", "auto"])
def test_pipeline_metrics_equal_plain_loop(ray_session, synth_root, tmp_path, mode, monkeypatch):
    """One actor pass + driver-side statistics give the plain loop's FID/KID/IS/LPIPS/IC-LPIPS/mask
    numbers per defect type, with 2 actors and a last generation batch that is not full (18 pairs, batch 4).

    ``tasks``: diversity as one Ray task per group from the pair blocks, FID/KID/IS computed by
    ``fidelity_and_diversity`` in this process. ``driver``: diversity in the driver from the pair
    blocks, FID/KID/IS as Ray tasks per level (``classes``). ``auto`` (a small evaluation, as
    ``evaluate`` runs it): diversity tasks from the LPIPS embeddings the map tasks made, FID/KID/IS
    tasks. All must give the loop's numbers."""
    import pyarrow.parquet as pq

    from defectforge.evaluate.pipeline import PipelineSpec, conditions_rows, generated_from_checkpoint, run_pipeline
    from defectforge.evaluate.run import fidelity_and_diversity, load_real
    from defectforge.methods.base import SamplingOptions, read_checkpoint_meta

    bench = _plain_loop()
    cfg = _cfg(synth_root, tmp_path, "sampling.batch_size=4")
    checkpoint = bench._checkpoint(cfg, tmp_path)
    context = read_checkpoint_meta(checkpoint)["context"]
    classes = {p: tuple(c) for p, c in context["classes"].items()}
    rows = conditions_rows(classes, 3)
    real = load_real(cfg, synth_root, list(classes), int(context["resolution"]))
    references = bench.reference_sets(real)
    plain = bench.sequential(cfg, checkpoint, rows, real["reference"], references, "randfeat", "randnet")

    spec = PipelineSpec(extractor="randfeat", weights_dir=None, lpips_kind="randnet", num_actors=2,
                        batch_size=4, seed=cfg.sampling.seed, diversity_on_driver=mode != "tasks",
                        lpips_in_pass=mode == "auto")
    gen = generated_from_checkpoint(checkpoint, rows, spec, SamplingOptions.from_config(cfg),
                                    data_root=str(synth_root), split=cfg.data.split.model_dump(mode="json"))
    result = run_pipeline(gen, real["reference"], references, spec, tmp_path / "artifacts",
                          classes=classes if mode != "tasks" else None)
    assert result.lpips_in_pass == (mode == "auto")
    n_types = sum(len(d) for d in classes.values())
    assert len(result.fidelity) == (n_types + len(classes) + 1 if mode != "tasks" else 0)
    if mode != "tasks":  # the numbers below must come from the pipeline's per-level tasks, not be redone here
        from defectforge.evaluate import pipeline

        groups = {(r["product"], r["defect"]) for r in rows}
        assert set(result.fidelity) == set(pipeline.fidelity_levels(classes, groups))

        def not_here(*args, **kwargs):
            raise AssertionError("fidelity_and_diversity recomputed a level the pipeline's tasks had computed")

        monkeypatch.setattr(pipeline, "level_fidelity", not_here)
    names = {"fid": "fid_randfeat", "kid": "kid_randfeat", "is": "is_randfeat", "lpips": "lpips_randnet",
             "ic_lpips": "ic_lpips_randnet"}
    metrics = fidelity_and_diversity(result, classes, names)

    assert result.n_generated == len(rows) == 18
    assert len(plain) == sum(len(d) for d in classes.values())
    for (p, d), want in plain.items():
        got = metrics["products"][p]["defects"][d]
        assert got["n_generated"] == 3
        for key, value in want.items():
            assert got[names.get(key, key)] == pytest.approx(value, rel=1e-5, abs=1e-9), (p, d, key)
    # the streamed statistics are those of the feature rows the driver holds
    key = next(iter(result.stats))
    np.testing.assert_allclose(result.stats[key].cov, GaussianStats.of(result.features[key]).cov, rtol=1e-9)
    # the pair blocks: numpy dicts with the columns consumers read (segmentation, sample grid)
    import ray

    blocks = ray.get(result.pair_refs)
    assert all({"image", "mask", "product", "defect", "id"} <= set(b) for b in blocks)
    assert sum(len(b["id"]) for b in blocks) == 18 and blocks[0]["image"].shape[1:] == (64, 64, 3)
    assert pq.read_table(result.pairs_path).num_rows == 18
    feats = pq.read_table(result.features_path)
    assert feats.num_rows == 18 + len(real["reference"])
    assert set(feats.column("source").to_pylist()) == {"generated", "real"}


# ------------------------------------------------------------------------------ errors early
def test_missing_standard_weights_names_the_file_before_generation(synth_root, tmp_path):
    from defectforge.evaluate.run import evaluate

    cfg = _cfg(synth_root, tmp_path, "evaluation.feature_extractor=standard",
               f"evaluation.weights_dir={tmp_path / 'weights'}", "evaluation.require_standard_weights=true")
    out = tmp_path / "eval"
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt"):
        evaluate(cfg, checkpoint=_fake_checkpoint(tmp_path), out=out, log_to_mlflow=False)
    assert not out.exists(), "work started before the weights check"


def test_without_standard_weights_the_stand_in_is_used_and_said_once(synth_root, tmp_path, monkeypatch, capsys):
    """One policy: no weights folder (or a folder without the files) -> stand-in extractors, one
    line, suffixed metric names; with the files present nothing changes."""
    from defectforge.evaluate.metrics.extractors import WEIGHTS_ENV
    from defectforge.evaluate.run import settle_extractors

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for weights in (None, tmp_path / "empty"):
        extra = [f"evaluation.weights_dir={weights}"] if weights else []
        cfg = _cfg(synth_root, tmp_path, "evaluation.feature_extractor=standard", *extra)
        settled = settle_extractors(cfg)
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
        assert settled.evaluation.feature_extractor == "randfeat"
        assert len(lines) == 1 and "stand-in" in lines[0] and "require_standard_weights" in lines[0], lines
        assert ("no weights directory" in lines[0]) if weights is None else ("inception-2015-12-05.pt" in lines[0])
    from defectforge.sweep.objectives import default_objective

    no_seg = _cfg(synth_root, tmp_path, "evaluation.feature_extractor=standard", "evaluation.segmentation=false")
    assert default_objective(settle_extractors(no_seg)) == "kid_randfeat:min"
    capsys.readouterr()
    randfeat = _cfg(synth_root, tmp_path, "evaluation.feature_extractor=randfeat")
    assert settle_extractors(randfeat) is randfeat and capsys.readouterr().out == ""


def _fake_checkpoint(tmp_path):
    from defectforge.methods.base import GeneratorContext, build_generator

    cfg = resolve_config(method="crop-paste", preset="tiny")
    gen = build_generator(cfg.method, GeneratorContext(("fabric",), {"fabric": ("hole",)}, 64))
    return gen.save_pretrained(tmp_path / "fake")


def test_exactly_one_source(synth_root, tmp_path):
    from defectforge.evaluate.run import evaluate

    with pytest.raises(ValueError, match="exactly one"):
        evaluate(_cfg(synth_root, tmp_path), out=tmp_path / "e", log_to_mlflow=False)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def crop_paste_checkpoint(ray_session, synth_root, tmp_path_factory):
    """A Crop-Paste checkpoint trained by the shared runner (the `defectforge train` path)."""
    from defectforge.train.runner import train

    tmp = tmp_path_factory.mktemp("cp-train")
    # One Ray Train worker: with num_workers=0 Train V2's local mode returns the deleted temp
    # checkpoint directory (reported to the lead); multi-product gives one checkpoint for both products.
    cfg = _cfg(synth_root, tmp, "train.scaling.num_workers=1", "train.mode=multi-product")
    [outcome] = train(cfg, tmp / "out", name="cp", log_to_mlflow=False)
    assert outcome.ok, outcome.error
    return outcome.checkpoint


def _check_summary(summary, products):
    names = summary["metric_names"]
    assert summary["extractor"] == "randfeat"
    assert names["fid"] == "fid_randfeat" and names["kid"] == "kid_randfeat" and names["is"] == "is_randfeat"
    assert names["lpips"] == "lpips_randnet" and names["ic_lpips"] == "ic_lpips_randnet"
    assert "fid" not in summary["overall"] and "kid" not in summary["overall"]
    assert sorted(summary["products"]) == sorted(products)
    for p, block in summary["products"].items():
        m = block["metrics"]
        for key in ("fid_randfeat", "kid_randfeat", "is_randfeat", "lpips_randnet", "ic_lpips_randnet",
                    "mask_area_w1", "mask_empty_rate", "mask_components_mean"):
            assert math.isfinite(m[key]), (p, key, m.get(key))
        assert m["fid_randfeat"] >= 0 and m["lpips_randnet"] > 0
        assert set(block["defects"]) and all(math.isfinite(d["fid_randfeat"]) for d in block["defects"].values())
        # defect quality, per defect type and as the product's mean over its types
        for d, dm in block["defects"].items():
            for key in QUALITY_KEYS:
                assert math.isfinite(dm[key]), (p, d, key, dm.get(key))
            assert dm["mask_area_ratio"] > 0 and 0 <= dm["mask_empty_rate"] <= 1
            assert dm["visibility_contrast_ratio"] == pytest.approx(
                dm["visibility_contrast"] / dm["visibility_contrast_real"])
            assert dm["memorisation_ratio"] == pytest.approx(dm["nn_gray_mad_generated"] / dm["nn_gray_mad_real_test"])
        for key in QUALITY_KEYS:
            assert m[key] == pytest.approx(np.mean([dm[key] for dm in block["defects"].values()])), (p, key)
        seg = block["segmentation"]
        assert seg["seeds"] == [0, 1]
        for metric in SEG_METRICS:
            for cond in ("real", "real+synthetic"):
                assert 0 <= seg[cond][metric]["mean"] <= 1 and math.isfinite(seg[cond][metric]["std"])
            gain = seg["gain"][metric]
            assert gain["mean"] == pytest.approx(seg["real+synthetic"][metric]["mean"] - seg["real"][metric]["mean"])
            assert math.isfinite(gain["std"])
    assert "seg_gain_pixel_auroc" in summary["segmentation"] and "seg_gain_pixel_auroc_std" in summary["segmentation"]
    for key in QUALITY_KEYS:
        assert math.isfinite(summary["overall"][key]), key


@pytest.mark.slow
def test_evaluate_crop_paste_checkpoint_end_to_end(crop_paste_checkpoint, synth_root, tmp_path):
    import json

    import mlflow
    import pyarrow.parquet as pq

    from defectforge.evaluate.run import evaluate

    cfg = _cfg(synth_root, tmp_path)
    summary_json = tmp_path / "summary.json"
    summary = evaluate(cfg, checkpoint=crop_paste_checkpoint, out=tmp_path / "eval",
                       summary_json=summary_json, name="eval-cp")
    _check_summary(summary, ["fabric", "metal"])
    assert summary["method"] == "crop-paste"
    assert summary["n_generated"] == 2 * 3 * 4
    assert json.loads(summary_json.read_text())["products"]["fabric"]["metrics"]["fid_randfeat"] == \
        pytest.approx(summary["products"]["fabric"]["metrics"]["fid_randfeat"])
    pairs = pq.read_table(summary["artifacts"]["pairs"])
    feats = pq.read_table(summary["artifacts"]["features"])
    assert pairs.num_rows == 24 and set(pairs.column_names) >= {"image", "mask", "product", "defect", "id"}
    assert set(feats.column("source").to_pylist()) == {"generated", "real"}
    assert (tmp_path / "eval" / "artifacts" / "sample_grid.png").is_file()

    from defectforge import tracking

    with tracking.active(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"):
        runs = mlflow.search_runs(experiment_names=["defectforge/crop-paste"],
                                  filter_string="tags.`defectforge.kind` = 'evaluate'")
    assert len(runs) == 1 and runs.iloc[0]["run_id"] == summary["mlflow_run_id"]
    row = runs.iloc[0]
    for key in ("fabric/fid_randfeat", "metal/kid_randfeat", "fabric/lpips_randnet",
                "fabric/seg_real_pixel_auroc", "fabric/seg_gain_pixel_ap_std", "seg_gain_pixel_auroc",
                "memorisation_ratio", "fabric/visibility_hf_ratio", "metal/mask_area_ratio",
                "fabric/hole/visibility_contrast_ratio"):
        assert math.isfinite(row[f"metrics.{key}"]), key
    artifacts = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").list_artifacts(
        summary["mlflow_run_id"])
    assert {"pairs", "features", "sample_grid.png", "summary.json"} <= {a.path for a in artifacts}


@pytest.mark.slow
def test_evaluate_generated_folder(crop_paste_checkpoint, synth_root, tmp_path):
    from defectforge.evaluate.run import evaluate
    from defectforge.generate import ConditionSource, GenerationPlan, sample_pairs, write_pairs
    from defectforge.methods.base import load_generator

    gen = load_generator(crop_paste_checkpoint)
    source = ConditionSource.for_generator(gen, synth_root)
    plan = GenerationPlan.balanced(gen.context, 12, products=["fabric"])
    rows, _ = sample_pairs(gen, plan, seed=0, batch_size=6, progress=False, source=source)
    folder = write_pairs(rows, tmp_path / "generated", gen.context)

    summary = evaluate(_cfg(synth_root, tmp_path), generated=folder, out=tmp_path / "eval", log_to_mlflow=False)
    _check_summary(summary, ["fabric"])
    assert summary["n_generated"] == 12 and summary["checkpoint"] is None


def test_generated_parquet_source(ray_session, synth_root, tmp_path):
    """A Parquet file of pairs (as generate.py writes) is read by Ray tasks, good rows dropped."""
    from defectforge.data.arrow import write_parquet
    from defectforge.data.mvtec import load_rows, scan_dataset
    from defectforge.evaluate.pipeline import generated_from_path

    index = scan_dataset(synth_root)
    refs = index.defect_refs("fabric")[:5] + index.good_refs("train")[:2]
    rows, _ = load_rows(index, refs, 64)
    path = write_parquet(rows, tmp_path / "pairs.parquet")
    ds, classes = generated_from_path(path, None, 32)
    out = ds.take_all()
    assert len(out) == 5 and {r["source"] for r in out} == {"generated"}
    assert out[0]["image"].shape == (32, 32, 3) and out[0]["mask"].shape == (32, 32)
    assert set(classes) == {"fabric"}


def test_an_evaluations_own_pairs_folder_is_a_generated_source(ray_session, synth_root, tmp_path):
    """``evaluate --generated <eval out>/artifacts/pairs``: the Parquet parts the map tasks write
    (``blocks.write_parts``: image columns in Ray Data's tensor type, not PNG) are read back as pairs,
    so a crashed evaluation's pairs can be scored again."""
    from defectforge.data.mvtec import load_rows, scan_dataset
    from defectforge.evaluate.blocks import write_parts
    from defectforge.evaluate.pipeline import generated_from_path

    index = scan_dataset(synth_root)
    rows, _ = load_rows(index, index.defect_refs("fabric")[:5], 64)
    out = {"image": np.stack([r["image"] for r in rows]), "mask": np.stack([r["mask"] for r in rows]),
           **{c: np.asarray([str(r[c]) for r in rows], dtype=object) for c in ("product", "defect", "id")},
           "split": np.asarray(["synthetic"] * 5, dtype=object), "source": np.asarray(["generated"] * 5, dtype=object),
           "features": np.zeros((5, 4)), "logits": np.zeros((5, 2))}
    (tmp_path / "pairs").mkdir(), (tmp_path / "features").mkdir()
    write_parts({k: v[:3] for k, v in out.items()}, str(tmp_path / "pairs"), str(tmp_path / "features"))
    write_parts({k: v[3:] for k, v in out.items()}, str(tmp_path / "pairs"), str(tmp_path / "features"))
    ds, classes = generated_from_path(tmp_path / "pairs", None, 32)
    got = sorted(ds.take_all(), key=lambda r: r["id"])
    assert len(got) == 5 and set(classes) == {"fabric"} and {r["source"] for r in got} == {"generated"}
    assert got[0]["image"].shape == (32, 32, 3) and got[0]["mask"].shape == (32, 32)
    assert [r["id"] for r in got] == sorted(str(r["id"]) for r in rows)
    with pytest.raises(ValueError, match=r"not a table of pairs .*'image'"):
        generated_from_path(tmp_path / "features", None, 32)  # the features folder beside it


@pytest.mark.slow
def test_all_split_skips_segmentation_and_sees_copies_of_training_images(ray_session, synth_root, tmp_path):
    """``data.split.protocol=all``: every defective image trains, so no defective test image is left.
    The downstream segmentation is skipped (and says so) and the memorisation baseline is undefined;
    "generated" pairs that are the training images themselves are at distance 0 from them and look
    exactly like the real pairs (every quality ratio 1)."""
    from defectforge.data.arrow import write_parquet
    from defectforge.data.mvtec import load_rows, scan_dataset
    from defectforge.evaluate.run import evaluate

    index = scan_dataset(synth_root, ["fabric"])
    rows, _ = load_rows(index, index.defect_refs("fabric"), 64)
    path = write_parquet(rows, tmp_path / "pairs.parquet")
    cfg = _cfg(synth_root, tmp_path, "data.split.protocol=all", "data.products=[fabric]")
    summary = evaluate(cfg, generated=path, out=tmp_path / "eval", log_to_mlflow=False, quiet=True)
    assert summary["segmentation"] == {} and set(summary["segmentation_skipped"]) == {"fabric"}
    assert "segmentation" not in summary["products"]["fabric"]
    defects = summary["products"]["fabric"]["defects"]
    assert set(defects) == {"hole", "scratch", "stain"}
    for d, m in defects.items():
        assert m["nn_gray_mad_generated"] == 0, d
        assert math.isnan(m["nn_gray_mad_real_test"]) and math.isnan(m["memorisation_ratio"]), d
        for key in ("mask_area_ratio", "visibility_contrast_ratio", "visibility_hf_ratio"):
            assert m[key] == pytest.approx(1.0), (d, key)
        assert m["mask_empty_rate"] == 0


@pytest.mark.slow
def test_zero_shot_product_skips_its_segmentation_and_measures_against_its_test_pairs(ray_session, synth_root,
                                                                                     tmp_path):
    """``data.split.zero_shot=[metal]``: metal has no defective training image, so its downstream
    segmentation (a real-only baseline with no defect to learn, no validation defect to pick a model
    on) is skipped with that reason, where it stopped the evaluation after every pair was drawn;
    fabric's runs; metal's defect quality is measured against its real (all test) pairs."""
    from defectforge.data.arrow import write_parquet
    from defectforge.data.mvtec import load_rows, scan_dataset
    from defectforge.evaluate.run import evaluate

    index = scan_dataset(synth_root)
    rows, _ = load_rows(index, index.defect_refs(), 64)
    path = write_parquet(rows, tmp_path / "pairs.parquet")
    cfg = _cfg(synth_root, tmp_path, "data.split.zero_shot=[metal]", "train.mode=multi-product",
               "evaluation.seg_seeds=1", method="defect-diffu")
    summary = evaluate(cfg, generated=path, out=tmp_path / "eval", log_to_mlflow=False, quiet=True)
    assert summary["segmentation_skipped"] == {"metal": "no defective training image (data.split.zero_shot)"}
    assert "segmentation" in summary["products"]["fabric"] and "segmentation" not in summary["products"]["metal"]
    for d, m in summary["products"]["metal"]["defects"].items():
        assert m["mask_empty_rate"] == 0 and m["mask_area_ratio"] == pytest.approx(1.0), d


@pytest.mark.slow
def test_one_defect_image_per_type_skips_segmentation_before_it_starts(ray_session, synth_root, tmp_path):
    """``data.split.protocol=first-k``, ``k=1``: one defective training image per type leaves the
    validation carve no defect to hold (it keeps one image of a type in train), which stopped the
    evaluation inside the segmentation tasks after every pair was scored; now the product's
    segmentation is skipped up front with the reason, and the rest of the evaluation stands."""
    from defectforge.data.arrow import write_parquet
    from defectforge.data.mvtec import load_rows, scan_dataset
    from defectforge.evaluate.run import evaluate

    index = scan_dataset(synth_root)
    rows, _ = load_rows(index, index.defect_refs("fabric"), 64)
    path = write_parquet(rows, tmp_path / "pairs.parquet")
    cfg = _cfg(synth_root, tmp_path, "data.split.protocol=first-k", "data.split.k=1", "data.products=[fabric]")
    summary = evaluate(cfg, generated=path, out=tmp_path / "eval", log_to_mlflow=False, quiet=True)
    assert list(summary["segmentation_skipped"]) == ["fabric"]
    assert summary["segmentation_skipped"]["fabric"].startswith("fewer than 2 defective training images")
    assert "segmentation" not in summary["products"]["fabric"] and summary["n_generated"] == len(rows)


def test_eval_block_caches_models_per_worker_and_keeps_the_generation_batches(tmp_path):
    """The CPU map task of the evaluation (``actors.eval_block``): a block of several generation
    batches gives the same pairs as one block per batch (each batch seeded by its first row); the
    worker's extractor and generator are built once and reused; a checkpoint rewritten at the
    same path (another SHA-256) is loaded afresh."""
    from defectforge.evaluate import actors
    from defectforge.methods.base import GeneratorContext, SamplingOptions, build_generator

    cfg = resolve_config(method="defect-gen", preset="tiny")
    ctx = GeneratorContext(("fabric",), {"fabric": ("hole", "scratch")}, 64)
    ckpt = build_generator(cfg.method, ctx).save_pretrained(tmp_path / "g")
    options = SamplingOptions(sampler="ddim", steps=2).to_json()
    generator = {"checkpoint": str(ckpt), "seed": 3, "sampling": options, "batch_size": 2, "reject_empty": False}
    rows = {"product": np.asarray(["fabric"] * 4), "defect": np.asarray(["hole", "scratch"] * 2),
            "index": np.arange(4)}
    actors._EXTRACTORS.clear(), actors._WORKER.clear()
    whole = actors.eval_block(dict(rows), "randfeat", generator=generator)
    extractor, loaded = next(iter(actors._EXTRACTORS.values())), actors._WORKER["actor"].gen
    halves = [actors.eval_block({k: v[s:s + 2] for k, v in rows.items()}, "randfeat", generator=generator)
              for s in (0, 2)]
    assert next(iter(actors._EXTRACTORS.values())) is extractor and actors._WORKER["actor"].gen is loaded
    np.testing.assert_array_equal(whole["image"], np.concatenate([h["image"] for h in halves]))
    np.testing.assert_array_equal(whole["mask"], np.concatenate([h["mask"] for h in halves]))
    assert list(whole["id"]) == ["00000", "00001", "00002", "00003"] and whole["features"].shape[0] == 4
    import shutil

    shutil.rmtree(ckpt)
    build_generator(cfg.method, ctx).save_pretrained(tmp_path / "g")  # new weights, same path
    again = actors.eval_block(dict(rows), "randfeat", generator=generator)
    assert actors._WORKER["actor"].gen is not loaded
    assert not np.array_equal(again["image"], whole["image"])


def test_a_conditions_block_carries_its_real_share_and_writes_its_own_parts(tmp_path):
    """``EvalActor.__call__`` with ``real_shards`` / ``parts`` (issue 12: no real blocks of their own, no
    separate write task): the conditions block numbered k also featurises real share k, after its
    pairs and with the same features as alone; its Parquet files hold every row's features and only
    the generated rows' pairs; ``split_block`` gives the same split from the Arrow block Ray Data makes
    of it; ``block_order`` puts blocks back in input order whatever order they finished in."""
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    from defectforge.evaluate import actors
    from defectforge.evaluate.blocks import split_block
    from defectforge.evaluate.pipeline import block_order
    from defectforge.methods.base import GeneratorContext, SamplingOptions, build_generator

    cfg = resolve_config(method="defect-gen", preset="tiny")
    ctx = GeneratorContext(("fabric",), {"fabric": ("hole", "scratch")}, 64)
    ckpt = build_generator(cfg.method, ctx).save_pretrained(tmp_path / "g")
    generator = {"checkpoint": str(ckpt), "seed": 3, "sampling": SamplingOptions(sampler="ddim", steps=2).to_json(),
                 "batch_size": 2, "reject_empty": False}
    rng = np.random.default_rng(0)
    real = [{"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "mask": np.zeros((64, 64), np.uint8),
             "product": "fabric", "defect": d, "id": f"{i:03d}", "split": "test", "source": "real"}
            for i, d in enumerate(["hole", "scratch", "hole"])]
    rows = {"product": np.asarray(["fabric"] * 4), "defect": np.asarray(["hole", "scratch"] * 2),
            "index": np.arange(4)}
    pairs_dir, features_dir = tmp_path / "pairs", tmp_path / "features"
    pairs_dir.mkdir(), features_dir.mkdir()
    actors._EXTRACTORS.clear(), actors._WORKER.clear()
    shards = [real[:2], real[2:]]
    second = actors.eval_block({k: v[2:] for k, v in rows.items()} | {"block": np.asarray([1, 1])}, "randfeat",
                               generator=generator, real_shards=shards, parts=(str(pairs_dir), str(features_dir)))
    first = actors.eval_block({k: v[:2] for k, v in rows.items()} | {"block": np.asarray([0, 0])}, "randfeat",
                              generator=generator, real_shards=shards, parts=(str(pairs_dir), str(features_dir)))
    alone = actors.eval_block(actors.real_batch(real[:2]), "randfeat")  # real rows as a block of their own
    assert list(first["source"]) == ["generated", "generated", "real", "real"]
    assert list(first["id"]) == ["00000", "00001", "000", "001"] and "block" not in first
    np.testing.assert_allclose(first["features"][2:], alone["features"], rtol=1e-6)
    np.testing.assert_array_equal(first["image"][2:], np.stack([r["image"] for r in real[:2]]))
    feats = pq.read_table(features_dir)
    assert feats.num_rows == 4 + 3 and feats.column("source").to_pylist().count("real") == 3
    pairs = pq.read_table(pairs_dir)
    assert pairs.num_rows == 4 and sorted(pairs.column("id").to_pylist()) == ["00000", "00001", "00002", "00003"]
    block = BlockAccessor.batch_to_block(first)
    pair_cols, feature_rows = split_block(block)
    assert list(pair_cols["id"]) == ["00000", "00001"] and pair_cols["image"].shape == (2, 64, 64, 3)
    assert list(feature_rows["source"]) == ["generated", "generated", "real", "real"]
    sliced, _ = split_block(block, 1, 3)
    assert list(sliced["id"]) == ["00001"]
    _, only_real = split_block(BlockAccessor.batch_to_block(alone))
    assert _ is None and len(only_real["id"]) == 2
    later = split_block(BlockAccessor.batch_to_block(second))[1]
    assert sorted([only_real, later, feature_rows], key=block_order) == [feature_rows, later, only_real]


@pytest.mark.slow
def test_conditions_are_cut_into_one_block_per_map_task_of_whole_batches_capped_in_bytes(ray_session, tmp_path,
                                                                                         monkeypatch):
    """``generated_from_checkpoint``: one block per concurrent map task (Ray Data notices finished
    tasks only every 0.1 s, so each extra wave idled a core), each a run of whole generation batches
    numbered in column ``block``; a big evaluation is cut finer so that a block holds at most
    ``BLOCK_MAX_BYTES`` of pixels."""
    from defectforge.evaluate import pipeline
    from defectforge.methods.base import GeneratorContext, build_generator

    cfg = resolve_config(method="defect-gen", preset="tiny")
    ckpt = build_generator(cfg.method, GeneratorContext(("fabric",), {"fabric": ("hole",)}, 64)).save_pretrained(
        tmp_path / "g")
    rows = pipeline.conditions_rows({"fabric": ("hole",)}, 50)  # 50 rows: 13 batches of 4, the last of 2
    spec = pipeline.PipelineSpec(extractor="randfeat", weights_dir=None, lpips_kind="randnet", num_actors=2,
                                 batch_size=4)

    def blocks(source):
        return [b["block"].tolist() for b in source.conditions.iter_batches(batch_size=None, batch_format="numpy")]

    source = pipeline.generated_from_checkpoint(ckpt, rows, spec)
    got = blocks(source)
    assert source.n_blocks == 2 and sorted(len(b) for b in got) == [22, 28]  # 7 and 6 batches
    assert sorted(b[0] for b in got) == [0, 1] and all(len(set(b)) == 1 for b in got)
    monkeypatch.setattr(pipeline, "BLOCK_MAX_BYTES", 3 * 4 * 64 * 64 * 4)  # 3 batches of 4 pairs at 64 px
    source = pipeline.generated_from_checkpoint(ckpt, rows, spec)
    assert source.n_blocks == 5 and sorted(len(b) for b in blocks(source)) == [2, 12, 12, 12, 12]


def test_generated_pairs_inside_the_output_folder_are_refused_before_anything_is_deleted(synth_root, tmp_path):
    """``evaluate --generated E/artifacts/pairs --out E``: the evaluation replaces ``E``, so it would
    delete the pairs it was asked to score; refused up front, naming both, with ``E`` untouched."""
    from defectforge.evaluate.run import evaluate

    pairs = tmp_path / "E" / "artifacts" / "pairs"
    pairs.mkdir(parents=True)
    (pairs / "part-0.parquet").write_bytes(b"kept")
    with pytest.raises(ValueError, match="lies inside the evaluation's output folder"):
        evaluate(_cfg(synth_root, tmp_path), generated=pairs, out=tmp_path / "E", log_to_mlflow=False, overwrite=True)
    assert (pairs / "part-0.parquet").read_bytes() == b"kept"


@pytest.mark.slow
def test_the_actor_pool_path_gets_the_real_shares_and_parts_through_ray_data(ray_session, tmp_path):
    """The GPU path maps ``EvalActor`` as a callable class (``ActorPoolStrategy``), with the real
    shares and Parquet folders as ``fn_kwargs`` of ``__call__``; run here on a CPU actor, so the
    plumbing the GPU evaluation relies on is exercised without a GPU: block 0 carries real share 0,
    block 1 carries none, and both blocks' Parquet parts are written."""
    import pyarrow.parquet as pq
    import ray

    from defectforge.evaluate.actors import EvalActor
    from defectforge.methods.base import GeneratorContext, SamplingOptions, build_generator

    cfg = resolve_config(method="defect-gen", preset="tiny")
    ckpt = build_generator(cfg.method, GeneratorContext(("fabric",), {"fabric": ("hole",)}, 64)).save_pretrained(
        tmp_path / "g")
    generator = {"checkpoint": str(ckpt), "seed": 0, "sampling": SamplingOptions(sampler="ddim", steps=2).to_json(),
                 "batch_size": 2, "reject_empty": False}
    rng = np.random.default_rng(0)
    real = [{"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "mask": np.zeros((64, 64), np.uint8),
             "product": "fabric", "defect": "hole", "id": f"{i:03d}", "split": "test", "source": "real"}
            for i in range(3)]
    conditions = ray.data.from_items([{"product": "fabric", "defect": "hole", "index": i, "block": i // 2}
                                      for i in range(4)], override_num_blocks=2)
    (tmp_path / "pairs").mkdir(), (tmp_path / "features").mkdir()
    ds = conditions.map_batches(EvalActor, batch_size=None, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=1),
                                fn_constructor_kwargs={"kind": "randfeat", "generator": generator},
                                fn_kwargs={"real_shards": [ray.put(real)],
                                           "parts": (str(tmp_path / "pairs"), str(tmp_path / "features")),
                                           "progress": False})
    rows = ds.take_all()
    assert sorted((r["source"], r["id"]) for r in rows) == [("generated", f"{i:05d}") for i in range(4)] + [
        ("real", f"{i:03d}") for i in range(3)]
    assert pq.read_table(tmp_path / "pairs").num_rows == 4 and pq.read_table(tmp_path / "features").num_rows == 7
