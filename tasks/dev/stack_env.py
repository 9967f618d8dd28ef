"""Where the embedded stack keeps its state, and its ``stack.env`` read back.

Apart from :mod:`tasks.dev.stack` (which starts and stops processes) so that a command that only
needs the running stack's variables (``bgremoval remove`` looking for an MLflow registry) imports
no process-management library: the core install has none.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_state_dir() -> Path:
    """Return the stack's state folder: ``$BGREMOVAL_STATE`` or ``<project>/.bgremoval``."""
    return Path(os.environ.get("BGREMOVAL_STATE") or PROJECT_ROOT / ".bgremoval").resolve()


@dataclass
class StackPaths:
    """Where the stack keeps its state."""

    root: Path

    @property
    def pids(self) -> Path:
        """The services' pid files."""
        return self.root / "pids"

    @property
    def logs(self) -> Path:
        """The services' logs."""
        return self.root / "logs"

    @property
    def airflow_home(self) -> Path:
        """``AIRFLOW_HOME``: Airflow's config and database."""
        return self.root / "airflow"

    @property
    def mlflow(self) -> Path:
        """MLflow's SQLite store and artifacts."""
        return self.root / "mlflow"

    @property
    def env_file(self) -> Path:
        """The environment a shell sources to use the stack (``stack.env``)."""
        return self.root / "stack.env"

    @property
    def info_file(self) -> Path:
        """What ``stack up`` started: endpoints, logins (``stack.json``)."""
        return self.root / "stack.json"


def read_env_file(state_dir: Path | None = None) -> dict[str, str]:
    """Read the variables of a running stack back from ``stack.env``; empty when there is none."""
    paths = StackPaths(state_dir or default_state_dir())
    if not paths.env_file.exists():
        return {}
    env = {}
    for line in paths.env_file.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env
