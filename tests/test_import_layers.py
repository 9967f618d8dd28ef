"""The layers of ``tasks/`` (DESIGN.md): an import-linter ``layers`` contract in pyproject.toml,
checked with ``lint-imports``. Function-level imports count. Skipped when import-linter is not
installed, except under CI (``CI=true``), where that is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    """The ``lint-imports`` executable of this venv (next to ``sys.executable``), else on PATH."""
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        reason = "import-linter is not installed (pip install -e '.[dev]' adds it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def test_tasks_imports_point_only_down_the_layers():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"lint-imports found imports that break the layers:\n{done.stdout}\n{done.stderr}"
