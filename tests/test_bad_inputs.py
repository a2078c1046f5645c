"""Bad input, tried as a new user would (issue 13): every case fails early with one ``error:`` line
naming the file or field (exit 2), or is refused without touching existing files.

Each test runs the command line in-process (``defectforge.cli.main``), takes a listing of the whole
temporary tree before and after, and checks that nothing outside the command's output folder
changed. No test here needs Ray: every refusal happens before Ray would start, and the tests say
so by checking Ray was not started by them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from defectforge import cli
from defectforge.config import resolve_config
from defectforge.methods.base import GeneratorContext, build_generator, file_sha256
from defectforge.paths import MARKER

PRODUCT = "fabric"
CTX = GeneratorContext((PRODUCT,), {PRODUCT: ("hole", "scratch", "stain")}, 64)


# ------------------------------------------------------------------------------------ helpers
def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``defectforge <argv>``, run in this process."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 2
    return code, capsys.readouterr().err


def listing(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size and content hash (files), so any change shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            out[rel] = ("other",)
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.stat().st_size, file_sha256(p))
    return out


def changed_outside(before: dict, after: dict, *inside: str) -> list[str]:
    """Paths added, removed or modified that are not under one of ``inside`` (relative paths)."""
    keys = set(before) | set(after)
    diff = [k for k in keys if before.get(k) != after.get(k)]
    return sorted(k for k in diff if not any(k == d or k.startswith(d.rstrip("/") + "/") for d in inside))


def one_line_error(err: str, *names: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


@pytest.fixture(scope="module")
def base_data(tmp_path_factory) -> Path:
    from defectforge.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("bad-inputs-data") / "data"
    write_synthetic(out, seed=0, size=64, products=1)
    return out


@pytest.fixture()
def world(tmp_path, base_data, monkeypatch) -> Path:
    """A temp tree: ``data/`` (a copy of the synthetic set), ``cwd/`` (the working directory)."""
    shutil.copytree(base_data, tmp_path / "data")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _checkpoint(path: Path, context: GeneratorContext = CTX) -> Path:
    cfg = resolve_config(preset="tiny", overrides=["data.resolution=64"])
    torch.manual_seed(0)
    return build_generator(cfg.method, context).save_pretrained(path)


@pytest.fixture()
def ckpt(world) -> Path:
    return _checkpoint(world / "ckpt")


def _rehash(ckpt: Path) -> None:
    meta = json.loads((ckpt / "config.json").read_text())
    meta["sha256"] = {f: file_sha256(ckpt / f) for f in meta["sha256"]}
    (ckpt / "config.json").write_text(json.dumps(meta))


def _generate(ckpt: Path, out: Path, *extra) -> list:
    return ["generate", "--checkpoint", ckpt, "--out", out, "--n", "2", "--steps", "2", "--device", "cpu",
            "--batch-size", "2", *extra]


# ------------------------------------------------------------------------- error hierarchy
def test_internal_bug_keeps_its_traceback_and_a_user_error_is_one_line(capsys):
    from defectforge.errors import DataError

    def bug() -> int:
        return {}["missing"]  # a bug's KeyError

    with pytest.raises(KeyError):
        cli.run_reporting_user_errors(bug)

    def user() -> int:
        raise DataError("/x/classes.json: field 'classes' is bad")

    assert cli.run_reporting_user_errors(user) == 2
    err = capsys.readouterr().err
    assert err == "error: /x/classes.json: field 'classes' is bad\n"


def test_old_error_names_still_import_and_share_the_base():
    from defectforge.config import ConfigError
    from defectforge.data.sample import DataError
    from defectforge.errors import DefectforgeError
    from defectforge.evaluate.metrics.extractors import MissingWeightsError
    from defectforge.methods.base import CheckpointError
    from defectforge.tracking import TrackingError

    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (CheckpointError, RuntimeError),
                         (TrackingError, RuntimeError), (MissingWeightsError, FileNotFoundError)):
        assert issubclass(cls, DefectforgeError) and issubclass(cls, builtin)


# ------------------------------------------------------------------- writes outside --out
HOSTILE = ["../../../X", "..", "a/b", "c\\d", "", " pad"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_defect_name_in_classes_json_is_refused_by_check_and_train(world, capsys, name):
    cfile = world / "data" / PRODUCT / "classes.json"
    cfile.write_text(json.dumps({"classes": ["hole", "scratch", "stain", name]}))
    before, ray_before = listing(world), _ray_started()

    code, err = run(["data", "check", world / "data"], capsys)
    assert code == 2
    one_line_error(err, str(cfile), "classes")
    assert listing(world) == before

    code, err = run(["train", "--data", world / "data", "--out", world / "runs", "--no-mlflow",
                     "train.steps=2"], capsys)
    assert code == 2
    one_line_error(err, str(cfile))
    assert changed_outside(before, listing(world), "runs") == []
    assert not (world.parent / "X").exists() and not (world / "X").exists()
    assert _ray_started() == ray_before  # refused before Ray starts


@pytest.mark.parametrize("name", ["../../X", "..", "a/b", "."])
def test_hostile_run_name_is_refused(world, capsys, name):
    before = listing(world)
    code, err = run(["train", "--data", world / "data", "--out", world / "runs", "--name", name,
                     "--no-mlflow"], capsys)
    assert code == 2
    one_line_error(err, "--name")
    assert listing(world) == before  # not even the run root is created

    code, err = run(["sweep", "--data", world / "data", "--run-root", world / "runs", "--name", name], capsys)
    assert code == 2
    one_line_error(err, "sweep.name")
    assert listing(world) == before


@pytest.mark.parametrize("field, value", [("products", ["../../X"]), ("classes", {PRODUCT: ["../../X"]})])
def test_hostile_names_in_a_checkpoint_are_refused_before_anything_is_written(world, ckpt, capsys, field, value):
    meta = json.loads((ckpt / "config.json").read_text())
    if field == "products":
        meta["context"]["products"] = value
        meta["context"]["classes"] = {value[0]: ["hole"]}
    else:
        meta["context"]["classes"] = value
    (ckpt / "config.json").write_text(json.dumps(meta))
    before = listing(world)
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(ckpt / "config.json"), f"context.{field}")
    assert listing(world) == before


def test_writers_refuse_a_path_that_escapes_the_output(tmp_path):
    from defectforge.errors import OutputError
    from defectforge.generate import write_pairs

    ctx = GeneratorContext(("../esc",), {"../esc": ("hole",)}, 8)  # built in code, not via a checked path
    row = {"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 8), np.uint8), "product": "../esc",
           "defect": "hole", "id": "00000", "split": "synthetic"}
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="path component"):
        write_pairs([row], tmp_path / "out", ctx)
    assert not (tmp_path / "esc").exists()


# ------------------------------------------------------------- silent overwrite or mix
def test_generate_into_an_earlier_generation_is_refused_and_overwrite_replaces_it(world, ckpt, capsys):
    out = world / "gen"
    code, err = run(_generate(ckpt, out), capsys)
    assert code == 0, err
    first = listing(world)
    assert (out / MARKER).is_file()

    code, err = run(_generate(ckpt, out, "--seed", "1"), capsys)
    assert code == 2
    one_line_error(err, str(out), "--overwrite")
    assert listing(world) == first

    # --overwrite replaces it whole: a smaller generation leaves no stale pair behind.
    code, err = run(["generate", "--checkpoint", ckpt, "--out", out, "--n", "1", "--steps", "2",
                     "--device", "cpu", "--overwrite"], capsys)
    assert code == 0, err
    assert len(list(out.rglob("*_mask.png"))) == 1 and len(list(out.rglob("test/*/*.png"))) == 1
    assert changed_outside(first, listing(world), "gen") == []


def test_generate_into_a_real_dataset_is_refused_even_with_overwrite(world, ckpt, capsys):
    before = listing(world)
    for extra in ([], ["--overwrite"]):
        code, err = run(_generate(ckpt, world / "data", *extra), capsys)
        assert code == 2
        one_line_error(err, str(world / "data"), "not created by defectforge")
        assert listing(world) == before  # refused before the model is even loaded


def test_synth_refuses_a_dataset_and_its_own_output_without_overwrite(world, capsys):
    before = listing(world)
    code, err = run(["data", "synth", "--out", world / "data", "--size", "32", "--products", "1"], capsys)
    assert code == 2
    one_line_error(err, str(world / "data"))
    assert listing(world) == before

    code, err = run(["data", "synth", "--out", world / "syn", "--size", "32", "--products", "1"], capsys)
    assert code == 0, err
    made = listing(world)
    code, err = run(["data", "synth", "--out", world / "syn", "--size", "32", "--products", "1", "--seed", "3"],
                    capsys)
    assert code == 2
    one_line_error(err, str(world / "syn"), "--overwrite")
    assert listing(world) == made
    code, err = run(["data", "synth", "--out", world / "syn", "--size", "32", "--products", "1", "--seed", "3",
                     "--overwrite"], capsys)
    assert code == 0, err
    assert changed_outside(made, listing(world), "syn") == []


def _recorded_run(world: Path, overrides: list[str]) -> Path:
    """A run folder as ``train`` leaves it (marker, config.yaml, split_manifest.json), without training."""
    from defectforge.config import save_config
    from defectforge.paths import claim_output
    from defectforge.train.data import load_training_data

    cfg = resolve_config(preset="tiny", overrides=[f"data.path={world / 'data'}", f"tracking.run_root={world / 'runs'}",
                                                   *overrides])
    claim_output(world / "runs", "run-root", resumable=True)
    run_dir, _ = claim_output(world / "runs" / "r", "train-run", resumable=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "split_manifest.json").write_text(json.dumps(load_training_data(cfg).manifest, indent=2))
    return run_dir


@pytest.mark.parametrize("change, named", [
    (["train.steps=3"], "train.steps"),
    (["method.small_widths=[8,16,16,16,16,16,16]"], "method.small_widths"),  # another architecture
    (["data.split.protocol=first-k", "data.split.k=2"], "split manifest"),
])
def test_resume_with_other_settings_is_refused_naming_the_difference(world, capsys, change, named):
    run_dir = _recorded_run(world, ["train.steps=2"])
    before, ray_before = listing(world), _ray_started()
    code, err = run(["train", "--data", world / "data", "--out", world / "runs", "--name", "r", "--no-mlflow",
                     "train.steps=2", *change], capsys)
    assert code == 2
    one_line_error(err, str(run_dir), named, "--overwrite")
    assert listing(world) == before  # config.yaml and the manifest still describe the old run
    assert _ray_started() == ray_before


def test_resume_with_the_same_settings_is_accepted(world):
    from defectforge.train.data import load_training_data
    from defectforge.train.runner import verify_resume

    run_dir = _recorded_run(world, ["train.steps=2", "train.log_every=1"])
    # log_every is bookkeeping: a resume may change it.
    cfg = resolve_config(preset="tiny", overrides=[f"data.path={world / 'data'}", "train.steps=2",
                                                   "train.log_every=5", f"tracking.run_root={world / 'runs'}"])
    verify_resume(run_dir, cfg, load_training_data(cfg).manifest)


def test_train_refuses_a_foreign_non_empty_out(world, capsys):
    before = listing(world)
    code, err = run(["train", "--data", world / "data", "--out", world / "data", "--no-mlflow"], capsys)
    assert code == 2
    one_line_error(err, str(world / "data"), "not created by defectforge")
    assert listing(world) == before


# --------------------------------------------------------------- checkpoints on trust
def test_one_flipped_byte_in_a_weight_file_is_refused(world, ckpt, capsys):
    weights = sorted(ckpt.glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    before = listing(world)
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(weights), "sha256")
    assert listing(world) == before


def test_nan_weights_are_refused_even_with_a_matching_hash(world, ckpt, capsys):
    weights = sorted(ckpt.glob("*.safetensors"))[0]
    state = load_file(str(weights))
    save_file({k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in state.items()},
              str(weights))
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(weights), "sha256")
    _rehash(ckpt)  # someone re-recorded the hash: the weights themselves are still checked
    before = listing(world)
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(weights), "non-finite")
    assert listing(world) == before


def test_a_checkpoint_from_a_newer_format_names_both_versions(world, ckpt, capsys):
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["provenance"]["defectforge_version"]  # written by save_pretrained
    meta["format"], meta["provenance"]["defectforge_version"] = 99, "9.9.9"
    (ckpt / "config.json").write_text(json.dumps(meta))
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(ckpt / "config.json"), "format 99", "9.9.9", "format 2")
    assert not (world / "gen").exists()


def test_truncated_weight_file_is_refused(world, ckpt, capsys):
    weights = sorted(ckpt.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(weights), "sha256")
    _rehash(ckpt)
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(weights), "safetensors")


def test_saving_non_finite_weights_is_refused(tmp_path):
    from defectforge.errors import CheckpointError

    cfg = resolve_config(preset="tiny", overrides=["data.resolution=64"])
    gen = build_generator(cfg.method, CTX)
    with torch.no_grad():
        next(gen.parameters()).fill_(float("inf"))
    with pytest.raises(CheckpointError, match="non-finite"):
        gen.save_pretrained(tmp_path / "c")


@pytest.mark.parametrize("edit, field", [
    (lambda m, raw: raw[: len(raw) // 2], "JSON"),  # truncated
    (lambda m, raw: json.dumps({k: v for k, v in m.items() if k != "method"}), "'method'"),
    (lambda m, raw: json.dumps({**m, "method": "crop-paste"}), "method_config"),  # another method's file
    (lambda m, raw: json.dumps({**m, "method": "no-such-method"}), "'method'"),
    (lambda m, raw: json.dumps({**m, "sha256": None}), "'sha256'"),
    (lambda m, raw: json.dumps({**m, "format": 1}), "'format'"),
    (lambda m, raw: json.dumps({**m, "method_config": {**m["method_config"], "u": "late"}}), "method_config"),
    (lambda m, raw: json.dumps([1, 2]), "JSON object"),
])
def test_bad_checkpoint_config_names_the_file(world, ckpt, capsys, edit, field):
    cfile = ckpt / "config.json"
    raw = cfile.read_text()
    cfile.write_text(edit(json.loads(raw), raw))
    before = listing(world)
    code, err = run(_generate(ckpt, world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(cfile), field)
    assert listing(world) == before


def test_missing_checkpoint_folder_is_named(world, capsys):
    code, err = run(_generate(world / "nope", world / "gen"), capsys)
    assert code == 2
    one_line_error(err, str(world / "nope"))


# ------------------------------------------------------------- arguments not validated
@pytest.mark.parametrize("extra, named", [
    (["--n", "0"], "--n"),
    (["--n", "-3"], "--n"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-attempts", "0"], "--max-attempts"),
    (["--product", "bolt"], "bolt"),
    (["--defects", "dent"], "--defects"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
    (["--device", "toaster"], "--device"),
    (["method.u=true"], "method.u"),
    (["train.steps=2"], "method-field overrides"),
])
def test_generate_arguments_fail_before_loading_or_sampling(world, ckpt, capsys, extra, named):
    before = listing(world)
    code, err = run(_generate(ckpt, world / "gen") + extra, capsys)
    assert code == 2
    one_line_error(err, named)
    assert listing(world) == before  # --out not even created


@pytest.mark.parametrize("override, named", [
    ("train.steps=true", "train.steps"),
    ("train.lr=false", "train.lr"),
    ("data.resolution=yes", "data.resolution"),
    ("train.steps=0", "train.steps"),
    ("method=defect-gen", "method"),
])
def test_config_values_are_validated_at_the_edge(world, capsys, override, named):
    before = listing(world)
    code, err = run(["config", override], capsys)
    assert code == 2
    one_line_error(err, named)
    assert listing(world) == before


def test_yaml_section_given_as_a_string_names_the_file(world, capsys):
    cfile = world / "cwd" / "bad.yaml"
    cfile.write_text("method: defect-gen\n")
    code, err = run(["config", "--config", cfile], capsys)
    assert code == 2
    one_line_error(err, str(cfile), "method")
    code, err = run(["train", "--config", cfile, "--out", world / "runs"], capsys)
    assert code == 2
    one_line_error(err, str(cfile))
    assert not (world / "runs").exists()


def run_fresh(world: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """``defectforge <argv>`` in a fresh interpreter that reports whether it started Ray: whether
    Ray is up in this pytest process (earlier tests start it) must not decide what is checked."""
    script = ("import sys, ray\n"
              "from defectforge import cli\n"
              "code = cli.main(sys.argv[1:])\n"
              "print('RAY_STARTED', ray.is_initialized())\n"
              "sys.exit(code)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=world / "cwd", timeout=300)


def test_gpu_request_without_a_gpu_is_refused_before_ray(world):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    proc = run_fresh(world, ["train", "--data", world / "data", "--out", world / "runs", "--no-mlflow",
                             "train.scaling.use_gpu=true", "train.scaling.num_workers=1"])
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc.stderr, "train.scaling.use_gpu")
    assert "RAY_STARTED False" in proc.stdout


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_resolution_the_receptive_field_cannot_divide_fails_before_ray(world, command):
    """Issue 11 acceptance 4: the generator is built on the meta device while the config is
    validated, so the mismatch is one line naming the fields, and no Ray session was started."""
    out = ["--out", world / "runs", "--no-mlflow"] if command == "train" else [
        "--method", "defect-gen", "--trials", "1", "--run-root", world / "runs"]
    # The large UNet's 6 downsamplings need a multiple of 64, whatever the swept receptive field.
    argv = [command, "--data", world / "data", *out, "data.resolution=96", "evaluation.feature_extractor=randfeat"]
    proc = run_fresh(world, argv)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    one_line_error(proc.stderr, "data.resolution", "method.large_downsamplings")
    assert "RAY_STARTED False" in proc.stdout


def test_unknown_product_for_train_is_named(world, capsys):
    code, err = run(["train", "--data", world / "data", "--out", world / "runs", "--product", "bolt",
                     "--no-mlflow"], capsys)
    assert code == 2
    one_line_error(err, "bolt", str(world / "data"))


def test_unwritable_out_fails_before_sampling(world, ckpt, capsys):
    blocker = world / "a-file"
    blocker.write_text("not a folder")
    before = listing(world)
    for out in (blocker, blocker / "sub"):
        code, err = run(_generate(ckpt, out), capsys)
        assert code == 2
        one_line_error(err, "--out", str(blocker))
        code, err = run(["data", "synth", "--out", out, "--size", "32", "--products", "1"], capsys)
        assert code == 2
        one_line_error(err, str(blocker))
        code, err = run(["train", "--data", world / "data", "--out", out, "--no-mlflow"], capsys)
        assert code == 2
        one_line_error(err, str(blocker))
    assert listing(world) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_before_sampling(world, ckpt, capsys):
    ro = world / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = run(_generate(ckpt, ro / "gen"), capsys)
        assert code == 2
        one_line_error(err, str(ro))
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------- blocking on odd files
def test_fifo_named_png_is_reported_and_never_opened(world, capsys):
    fifo = world / "data" / PRODUCT / "test" / "hole" / "999.png"
    os.mkfifo(fifo)
    mask_fifo = world / "data" / PRODUCT / "ground_truth" / "scratch" / "998_mask.png"
    os.mkfifo(mask_fifo)
    result: dict = {}

    def check() -> None:
        result["run"] = run(["data", "check", world / "data"], capsys)

    worker = threading.Thread(target=check, daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():  # unblock the reader so the session can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("data check blocked on a FIFO")
    code, _ = result["run"]
    assert code == 1
    from defectforge.data.check import check_dataset

    report = check_dataset(world / "data")
    problems = {str(p): why for p, why in report.bad}
    assert "FIFO" in problems[str(fifo)] and "FIFO" in problems[str(mask_fifo)]
    assert report.n_images == 40 + 10 + 3 * 12  # the FIFO is not counted as an image


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_refuses_a_foreign_out_and_an_unsafe_name_before_ray(world, ckpt, capsys):
    before, ray_before = listing(world), _ray_started()
    base = ["evaluate", "--checkpoint", ckpt, "--data", world / "data", "--no-mlflow",
            "evaluation.feature_extractor=randfeat", f"tracking.run_root={world / 'runs'}"]
    code, err = run(base + ["--out", world / "data", "--overwrite"], capsys)
    assert code == 2
    one_line_error(err, str(world / "data"), "not created by defectforge")
    code, err = run(base + ["--name", "../../X"], capsys)
    assert code == 2
    one_line_error(err, "--name")
    assert listing(world) == before
    assert _ray_started() == ray_before


# ------------------------------------------------------------------------------ sweep resume
def test_resuming_a_sweep_with_other_settings_is_refused_before_ray(world):
    """A sweep restored under the same name must be the same sweep: Tune would restore the old
    trials and run the rest with the new settings, one table mixing two sweeps."""
    from defectforge.paths import claim_output
    from defectforge.sweep.objectives import parse_objectives
    from defectforge.sweep.run import check_resume, resume_record
    from defectforge.sweep.space import load_space

    base = [f"data.path={world / 'data'}", "data.products=[fabric]", f"tracking.run_root={world / 'runs'}",
            "evaluation.feature_extractor=randfeat", "sweep.objective=seg_gain_pixel_ap:max",
            "train.scaling.num_workers=1"]  # as sweep() records it (trials train on a Ray Train worker)
    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=base)
    storage = world / "runs" / "sweeps"
    objectives = parse_objectives("seg_gain_pixel_ap:max")
    space = load_space("defect-gen", preset="tiny").source
    claim_output(world / "runs", "run-root", resumable=True)  # as the interrupted sweep left it
    check_resume(str(storage), "rs-fabric", resume_record(cfg, space, objectives, ["fabric"]))  # first start
    (storage / "rs-fabric").mkdir(parents=True)  # Tune's folder of the interrupted study
    check_resume(str(storage), "rs-fabric", resume_record(cfg, space, objectives, ["fabric"]))  # same: resumes
    before = listing(world)
    proc = run_fresh(world, ["sweep", "--method", "defect-gen", "--data", world / "data", "--products", "fabric",
                             "--name", "rs", "--run-root", world / "runs", "--objective", "seg_gain_pixel_ap:max",
                             "--trials", "9", "evaluation.feature_extractor=randfeat", "train.steps=7"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    one_line_error(proc.stderr, "rs-fabric", "config.train.steps", "another sweep.name")
    assert "RAY_STARTED False" in proc.stdout
    assert changed_outside(before, listing(world), "runs/mlflow.db", "runs/mlartifacts") == []


def test_a_run_root_holding_only_defectforge_folders_is_shared_and_nothing_else_is(tmp_path):
    """``train --out runs/dg`` then ``evaluate`` (default run root ``runs``): ``runs`` holds only a
    defectforge folder, so the next command may use it (the README's sequence); one foreign
    entry beside it and it is refused as before."""
    from defectforge.paths import OutputError, claim_output, read_marker

    runs = tmp_path / "runs"
    claim_output(runs / "dg", "run-root", resumable=True)
    folder, resumed = claim_output(runs, "run-root", resumable=True, flag="tracking.run_root")
    assert folder == runs and resumed and read_marker(runs)["kind"] == "run-root"
    other = tmp_path / "other"
    claim_output(other / "dg", "run-root", resumable=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not created by defectforge"):
        claim_output(other, "run-root", resumable=True, flag="tracking.run_root")
    assert read_marker(other) is None and (other / "notes.txt").read_text() == "mine"
    # Only a run root: an unmarked train-run folder of marked folders is refused (with --overwrite
    # it would otherwise be deleted whole), and a run root is never claimed that way to overwrite.
    legacy = tmp_path / "legacy-run"
    claim_output(legacy / "inner", "run-root", resumable=True)
    with pytest.raises(OutputError, match="not created by defectforge"):
        claim_output(legacy, "train-run", resumable=True, overwrite=True)
    with pytest.raises(OutputError, match="not created by defectforge"):
        claim_output(legacy, "run-root", resumable=True, overwrite=True)
    assert (legacy / "inner").is_dir() and read_marker(legacy) is None
