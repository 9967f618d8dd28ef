"""The layers of ``tasks/`` (DESIGN.md): an import-linter ``layers`` contract in pyproject.toml,
checked with ``lint-imports``. Function-level imports count. Skipped when import-linter is not
installed, except under CI (``CI=true``), where that is a failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_tasks_imports_point_only_down_the_layers(tool):
    lint_imports = tool("lint-imports", "pip install -e '.[dev]' adds import-linter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([lint_imports, "--no-cache"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"lint-imports found imports that break the layers:\n{done.stdout}\n{done.stderr}"
