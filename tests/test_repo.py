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
