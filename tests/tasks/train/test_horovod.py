"""Tests for the Horovod backend: two ``horovodrun --gloo`` workers on the CPU.

Horovod is built from its sdist by ``scripts/install-horovod.sh``; where it is not installed the
tests are skipped, except under CI (``CI=true``), where a missing Horovod is a failure. The model
is a tiny U2-Net at 64 px so a run takes seconds.
"""

from __future__ import annotations

import os

import pytest
import torch


pytestmark = pytest.mark.process

torch.set_num_threads(1)


def _horovod_missing() -> str | None:
    """Why Horovod cannot be used here, or None when it can."""
    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        return f"horovod.torch is not importable ({exc}): run scripts/install-horovod.sh"
    from tasks.train.horovod_backend import horovodrun_executable

    try:
        horovodrun_executable()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def _require_horovod() -> None:
    """Skip the calling test when Horovod is missing; fail it instead under CI (``CI=true``)."""
    reason = _horovod_missing()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but Horovod is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def test_two_horovod_workers_end_with_identical_weights_and_log_averaged_metrics_once(
        tiny_config, check_two_worker_run) -> None:
    _require_horovod()
    from tasks.train.horovod_backend import launch_local

    # channels_last: the gradients Horovod averages are then dense but not contiguous.
    config = tiny_config("horovod-test", device="cpu", amp="off", channels_last=True)
    result = launch_local(config, nproc=2, timeout_s=300)

    check_two_worker_run(result, "horovod-test")
