"""The fault-injection hook is inert unless its environment variables ask for this epoch and rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.train.faults import KILL_AFTER_EPOCH, KILL_RANK, exit_if_asked, kill_env

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def test_kill_env_names_the_epoch_and_rank() -> None:
    assert kill_env(after_epoch=2, rank=0) == {KILL_AFTER_EPOCH: "2", KILL_RANK: "0"}


def test_without_the_variables_the_hook_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_AFTER_EPOCH, raising=False)
    monkeypatch.delenv(KILL_RANK, raising=False)
    for epoch in range(3):
        exit_if_asked(epoch, rank=1)


@pytest.mark.parametrize(("epoch", "rank", "status"), [(1, 1, 1), (0, 1, 0), (1, 0, 0)])
def test_only_the_chosen_epoch_and_rank_exit(epoch: int, rank: int, status: int) -> None:
    code = f"from tasks.train.faults import exit_if_asked; exit_if_asked({epoch}, {rank})"
    env = {**kill_env(after_epoch=1, rank=1), "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT_ROOT, check=False)
    assert done.returncode == status
