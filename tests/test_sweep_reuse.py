"""Train once, sweep many, end to end: a sweep whose trials differ only in sampling-time fields
shares trained generators (asserted from the MLflow tags every trial's child run carries)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from defectforge.config import resolve_config

TINY = ["train.steps=4", "train.checkpoint_every=2", "train.batch_size=4", "evaluation.feature_extractor=randfeat",
        "evaluation.n_per_defect=2", "evaluation.segmentation=false", "sampling.steps=3"]


@pytest.mark.slow
def test_four_trials_two_differing_only_in_u_train_three_generators(ray_session, synth_root, tmp_path):
    from defectforge.sweep.run import sweep

    # Beside the run root, not in it: a run root must be empty or defectforge's own (paths.py).
    space = tmp_path.with_name(tmp_path.name + "-spaces") / "space.yaml"
    space.parent.mkdir(exist_ok=True)
    # Trials 1 and 2 differ only in u (sampling-time): one training. Trials 3 and 4 change the lr.
    space.write_text(
        "method: defect-gen\nparameters:\n"
        "  train.lr: {type: categorical, choices: [5.0e-4, 1.0e-3, 2.0e-3]}\n"
        "  method.u: {type: categorical, choices: [100, 300]}\n"
        "points_to_evaluate:\n"
        "  - {train.lr: 5.0e-4, method.u: 100}\n"
        "  - {train.lr: 5.0e-4, method.u: 300}\n"
        "  - {train.lr: 1.0e-3, method.u: 100}\n"
        "  - {train.lr: 2.0e-3, method.u: 100}\n")
    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=[
        f"data.path={synth_root}", "data.products=[fabric]", f"tracking.run_root={tmp_path}",
        f"sweep.space={space}", "sweep.num_trials=4", "sweep.name=reuse", "sweep.scheduler=none",
        "sweep.max_concurrent=2", "sweep.objective=kid_randfeat:min", "sweep.register_model=false", *TINY])
    summary = sweep(cfg)
    [study] = summary["studies"]
    assert [t["status"] for t in study["trials"]] == ["done"] * 4

    client = mlflow.MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("defectforge/defect-gen")
    runs = client.search_runs([exp.experiment_id], "tags.`defectforge.sweep` = 'reuse-fabric' and "
                                                   "tags.`defectforge.kind` = 'trial'")
    assert len(runs) == 4
    keys = Counter(r.data.tags["defectforge.train_key"] for r in runs)
    assert sorted(keys.values()) == [1, 1, 2]  # 3 trainings; the u pair shares one
    trained = [r for r in runs if r.data.tags["defectforge.trained_here"] == "true"]
    assert len(trained) == 3 and len({r.data.tags["defectforge.train_key"] for r in trained}) == 3
    shared_key = next(k for k, n in keys.items() if n == 2)
    pair = [r for r in runs if r.data.tags["defectforge.train_key"] == shared_key]
    assert {int(float(r.data.params["method.u"])) for r in pair} == {100, 300}
    trainer = next(r for r in pair if r.data.tags["defectforge.trained_here"] == "true")
    reuser = next(r for r in pair if r.data.tags["defectforge.trained_here"] == "false")
    assert reuser.data.tags["defectforge.trained_by_run"] == trainer.info.run_id
    assert reuser.data.tags["defectforge.train_run"] == trainer.data.tags["defectforge.train_run"]
    # Three Train runs on storage, not four.
    train_dirs = [p for p in (Path(summary["storage"]) / "train-once").iterdir() if p.is_dir()]
    assert len(train_dirs) == 3
    # Each trial samples with its OWN u, also the one reusing another trial's generator: its
    # evaluation used it, and its checkpoint (the one generate / the registry get) records it.
    for r in runs:
        tid, u = r.data.tags["defectforge.trial_id"], int(float(r.data.params["method.u"]))
        evaluated = json.loads((Path(summary["storage"]) / "eval" / f"reuse-fabric-{tid}" / "summary.json").read_text())
        assert evaluated["sampling"]["method"] == {"u": u} and evaluated["sampling"]["steps"] == 3
        row = next(t for t in study["trials"] if t["trial_id"] == tid)
        recorded = json.loads((Path(row["checkpoint_dir"]) / "config.json").read_text())["sampling"]
        assert recorded["method"] == {"u": u} and recorded["steps"] == 3
    assert {trainer.data.tags["defectforge.trial_id"], reuser.data.tags["defectforge.trial_id"]} == {
        t["trial_id"] for t in study["trials"] if int(t["params"]["method.u"]) in (100, 300)
        and float(t["params"]["train.lr"]) == 5.0e-4}
    # and the trial times a sweep benchmark needs: the reuser trained nothing itself
    times = {t["trial_id"]: t for t in study["trials"]}
    assert times[reuser.data.tags["defectforge.trial_id"]]["train_s"] == 0.0
    assert times[trainer.data.tags["defectforge.trial_id"]]["train_s"] > 0
    assert all(t["eval_s"] > 0 for t in study["trials"])


@pytest.mark.slow
def test_a_backbone_is_pretrained_once_per_study_and_trials_start_from_it(ray_session, synth_root, tmp_path):
    """Issue 14, acceptance 5: a 2-trial AnomalyDiffusion sweep whose trials differ in the method's
    own fields trains the backbone stage once (one pretraining run in MLflow, both trials name its
    directory and train only their own stages from it); a second sweep of the same name and storage
    (a restore) does not pretrain again."""
    from defectforge.sweep.run import sweep

    space = tmp_path.with_name(tmp_path.name + "-spaces") / "space.yaml"
    space.parent.mkdir(exist_ok=True)
    # The trials differ in the method's own fields and in train.lr, the method stages' rate: with the
    # backbone's own rate set (method.backbone_lr), neither changes the pretraining, so one is shared
    # (a sweep over train.lr once pretrained per trial).
    space.write_text("method: anomaly-diffusion\nparameters:\n"
                     "  method.k: {type: categorical, choices: [1, 2]}\n"
                     "  train.lr: {type: categorical, choices: [1.0e-3, 5.0e-4]}\n"
                     "points_to_evaluate:\n  - {method.k: 1, train.lr: 1.0e-3}\n  - {method.k: 2, train.lr: 5.0e-4}\n")
    overrides = [f"data.path={synth_root}", "data.products=[fabric]", f"tracking.run_root={tmp_path}",
                 f"sweep.space={space}", "sweep.num_trials=2", "sweep.name=pre", "sweep.scheduler=none",
                 "sweep.max_concurrent=2", "sweep.objective=kid_randfeat:min", "sweep.register_model=false",
                 "method.backbone_steps=3", "method.backbone_lr=1e-3", *TINY]
    cfg = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=overrides)
    summary = sweep(cfg)
    [study] = summary["studies"]
    assert [t["status"] for t in study["trials"]] == ["done"] * 2

    client = mlflow.MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("defectforge/anomaly-diffusion")
    pre = client.search_runs([exp.experiment_id], "tags.`defectforge.kind` = 'pretraining'")
    assert len(pre) == 1 and pre[0].info.status == "FINISHED"
    name = pre[0].data.tags["defectforge.pretraining"]
    trials = client.search_runs([exp.experiment_id], "tags.`defectforge.kind` = 'trial'")
    assert len(trials) == 2 and {r.data.tags["defectforge.pretraining"] for r in trials} == {name}
    assert len({r.data.tags["defectforge.train_key"] for r in trials}) == 2  # k differs: two trainings
    once = Path(summary["storage"]) / "train-once"
    assert sorted(p.name for p in once.iterdir() if p.is_dir() and "-pre-" in p.name) == [name]
    pretrained = json.loads((once / name / "TRAINED.json").read_text())["checkpoint"]
    for row in study["trials"]:
        meta = json.loads((Path(row["checkpoint_dir"]) / "config.json").read_text())
        train_cfg = meta["provenance"]["config"]["train"]
        assert train_cfg["stages"] == ["anomaly", "mask"] and train_cfg["init_modules"] == ["backbone"]
        assert train_cfg["init_from"] == str(Path(pretrained) / "generator")
        assert set(meta["modules"]) == {"backbone", "anomaly", "mask_embedding"}  # self-contained

    # A third trial in a new study on the same storage and data would pretrain again (the study
    # is part of the name); within the study, a trial started after the pretraining (here: the
    # pretraining's done marker is what any later or restored trial finds) reuses it.
    from defectforge.train import reuse

    assert reuse.read_done(once / name)["trained_by"] in {t["trial_id"] for t in study["trials"]}
