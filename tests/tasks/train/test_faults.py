"""The fault-injection hook is inert unless its environment variables ask for this epoch and rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.train.faults import KILL_AFTER_EPOCH, KILL_RANK, kill_env

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def test_kill_env_names_the_epoch_and_rank() -> None:
    assert kill_env(after_epoch=2, rank=0) == {KILL_AFTER_EPOCH: "2", KILL_RANK: "0"}


@pytest.mark.parametrize(("epoch", "rank", "asked", "status"), [
    (1, 1, True, 1), (0, 1, True, 0), (1, 0, True, 0),  # only the chosen epoch and rank exit
    (1, 1, False, 0),  # without the variables the hook returns, whatever the epoch and rank
])
def test_only_the_chosen_epoch_and_rank_exit(epoch: int, rank: int, asked: bool, status: int) -> None:
    code = (f"from tasks.train.faults import exit_if_asked; exit_if_asked({epoch}, {rank}); "
            "print('returned')")
    env = {**(kill_env(after_epoch=1, rank=1) if asked else {}), "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT_ROOT, check=False,
                          capture_output=True, text=True)
    assert done.returncode == status
    assert ("returned" in done.stdout) == (status == 0)
