"""Config resolution: presets, files, overrides, and errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from defectforge.config import ConfigError, parse_override, resolve_config, with_overrides


def test_tiny_preset_and_overrides_layer_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\n  lr: 0.01\ndata:\n  resolution: 32\n")
    cfg = resolve_config(preset="tiny", config_file=f, overrides=["train.lr=1e-3", "sampling.n=3"])
    assert cfg.preset == "tiny"
    assert cfg.train.steps == 7            # file beats preset
    assert cfg.train.lr == pytest.approx(1e-3)  # override beats file (1e-3 parsed as a number)
    assert cfg.sampling.n == 3
    assert cfg.data.resolution == 32
    assert cfg.method.name == "defect-gen"


def test_paper_preset_differs_from_tiny():
    tiny, paper = resolve_config(preset="tiny"), resolve_config(preset="paper")
    assert paper.data.resolution == 256 and tiny.data.resolution < 256
    assert paper.train.weight_decay == pytest.approx(2e-3)
    assert paper.train.ema_decay == pytest.approx(0.9999)


def test_negative_lr_names_the_field():
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides=["train.lr=-1"])
    msg = str(err.value)
    assert "train.lr" in msg and "command-line overrides" in msg


def test_unknown_method_names_the_field():
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'nope'"):
        resolve_config(method="nope")
    with pytest.raises(ConfigError, match=r"method\.name"):
        resolve_config(overrides=["method.name=nope"])


def test_unknown_key_and_file_are_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        resolve_config(config_file=f)
    assert "train.stepz" in str(err.value) and str(f) in str(err.value)
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(config_file=tmp_path / "missing.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")
    assert parse_override("data.products=[a, b]") == (["data", "products"], ["a", "b"])


def test_with_overrides_revalidates():
    cfg = resolve_config()
    assert with_overrides(cfg, {"train.steps": 3}).train.steps == 3
    with pytest.raises(ConfigError, match="train.steps"):
        with_overrides(cfg, {"train.steps": 0})


def test_cli_rejects_bad_value_before_any_work(tmp_path):
    """A bad value exits 2 with the field named, without starting Ray or touching the data."""
    proc = subprocess.run([sys.executable, "-m", "defectforge.cli", "train", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "runs"), "train.lr=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.lr" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_methods_run_preset_layers_between_the_global_preset_and_the_user(tmp_path):
    """DefectSynth's laptop preset reports every 100 steps (its ControlNet stage has 300); a config
    file and an override still win over it, and other methods keep the global laptop value."""
    assert resolve_config(method="defect-synth", preset="laptop").train.checkpoint_every == 100
    assert resolve_config(method="defect-gen", preset="laptop").train.checkpoint_every == 200
    assert resolve_config(method="defect-synth", preset="tiny").train.checkpoint_every == 100
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  checkpoint_every: 50\n")
    assert resolve_config(method="defect-synth", preset="laptop",
                          config_file=cfg_file).train.checkpoint_every == 50
    assert resolve_config(method="defect-synth", preset="laptop",
                          overrides=["train.checkpoint_every=7"]).train.checkpoint_every == 7


def test_local_paths_are_stored_absolute_so_trials_in_other_folders_find_them(tmp_path, monkeypatch):
    # Tune runs each trial in its own working folder: `--data data/synth` typed in the user's folder
    # must reach the trial as that folder (a sweep's every trial failed with "dataset folder not found").
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=[
        "data.path=data/synth", "data.split.metadata=meta.csv", "data.split.manifest=~/split.csv",
        "evaluation.weights_dir=weights", "method.backbone.path=runs/bb/generator"])
    assert cfg.data.path == str(tmp_path / "data" / "synth")
    assert cfg.data.split.metadata == str(tmp_path / "meta.csv")
    assert cfg.data.split.manifest == str(Path.home() / "split.csv")
    assert cfg.evaluation.weights_dir == str(tmp_path / "weights")
    assert cfg.method.backbone.path == str(tmp_path / "runs" / "bb" / "generator")
    monkeypatch.chdir(tmp_path / "..")  # re-validated elsewhere (a worker): unchanged
    assert with_overrides(cfg, {}).data.path == cfg.data.path
    assert resolve_config(preset="tiny").data.path is None  # null stays null (the built-in data)


def test_a_relative_search_space_file_is_loaded_by_its_absolute_path(tmp_path, monkeypatch):
    from defectforge.sweep.space import REPO_SPACES, load_space

    (tmp_path / "s.yaml").write_text((REPO_SPACES / "crop_paste.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert load_space("s.yaml").source == tmp_path / "s.yaml"


def test_defect_diffu_is_multi_product_by_default():
    """The paper's point is one DiT for every product (issue 17: its sweep is multi-product by
    default); per-product stays one override away, and the other methods keep per-product."""
    for preset in ("tiny", "laptop", "paper"):
        assert resolve_config(method="defect-diffu", preset=preset).train.mode == "multi-product"
    assert resolve_config(method="defect-diffu", overrides=["train.mode=per-product"]).train.mode == "per-product"
    assert resolve_config(method="anomaly-diffusion").train.mode == "per-product"


def test_zero_shot_is_checked_against_the_method_and_the_training_mode():
    ok = resolve_config(method="defect-diffu", overrides=["data.split.zero_shot=[metal]", "train.mode=multi-product",
                                                          "data.products=[fabric,metal]"])
    assert ok.data.split.zero_shot == ["metal"]
    with pytest.raises(ConfigError, match="method 'defect-gen' cannot draw a product's defects"):
        resolve_config(method="defect-gen", overrides=["data.split.zero_shot=[metal]", "train.mode=multi-product"])
    with pytest.raises(ConfigError, match="needs train.mode=multi-product"):
        resolve_config(method="defect-diffu", overrides=["data.split.zero_shot=[metal]", "train.mode=per-product"])
    with pytest.raises(ConfigError, match="lists every product"):
        resolve_config(method="defect-diffu", overrides=["data.split.zero_shot=[metal]", "train.mode=multi-product",
                                                         "data.products=[metal]"])
