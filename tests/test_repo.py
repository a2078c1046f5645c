"""The repository's promises about itself: the README's test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv[^\n]+)\n```", text)


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2, "README must give the main-job command and the test command"
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f".ci/run does not run the README's test command:\n{test_cmd}"


def test_main_job_command_runs_the_sweep_job():
    main_cmd = next(c for c in _readme_commands() if "pytest" not in c)
    assert "jobs/sweep_defectgen.py" in main_cmd
    assert (ROOT / "jobs" / "sweep_defectgen.py").is_file()


def test_no_init_py_in_platform():
    """A package named `platform` would shadow the standard library and break torch/ray imports."""
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_ruff_check_passes_with_the_configured_rules():
    """``pyproject.toml``'s [tool.ruff] rules hold over the package, the jobs and the tests (ruff
    is in the ``test`` extra, so CI runs this)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "platform", "jobs", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_each_method_has_one_name_for_module_and_search_space():
    """``defect-gen`` -> ``methods/defect_gen.py`` and ``search_spaces/defect_gen.yaml``."""
    from defectforge.methods import registry
    from defectforge.sweep.space import find_space_file

    for name, cls in registry.generators().items():
        if name.startswith("test-"):  # toy methods tests register in-process (tests/test_train_loop.py)
            continue
        stem = name.replace("-", "_")
        assert cls.__module__ == f"defectforge.methods.{stem}", (name, cls.__module__)
        assert find_space_file(name) == ROOT / "search_spaces" / f"{stem}.yaml"
