"""Fault injection for the resume tests, behind environment variables that production never sets.

A test that must prove a killed worker is survivable launches training with
:func:`kill_env` in the workers' environment; the loop calls :func:`exit_if_asked` after each
epoch's checkpoint and barrier. With neither variable set (every real run) the hook does nothing.
"""

from __future__ import annotations

import logging
import os

#: The epoch after whose checkpoint the chosen worker dies.
KILL_AFTER_EPOCH = "BGREMOVAL_TEST_KILL_AFTER_EPOCH"
#: The rank of the worker that dies (default 1).
KILL_RANK = "BGREMOVAL_TEST_KILL_RANK"


def kill_env(after_epoch: int, rank: int = 1) -> dict[str, str]:
    """Return the environment that makes worker ``rank`` exit right after epoch ``after_epoch``."""
    return {KILL_AFTER_EPOCH: str(after_epoch), KILL_RANK: str(rank)}


def exit_if_asked(epoch: int, rank: int) -> None:
    """Exit this process with status 1, like a killed worker, when the environment asks for it."""
    after = os.environ.get(KILL_AFTER_EPOCH)
    if after is None or int(after) != epoch or int(os.environ.get(KILL_RANK, "1")) != rank:
        return
    logging.shutdown()
    os._exit(1)
