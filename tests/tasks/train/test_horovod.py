"""Tests for the Horovod backend: two ``horovodrun --gloo`` workers on the CPU.

Horovod is built from its sdist by ``scripts/install-horovod.sh``; where it is not installed the
tests are skipped, except under CI (``CI=true``), where a missing Horovod is a failure. The model
is a tiny U2-Net at 64 px so a run takes seconds.
"""

from __future__ import annotations

import os

import pytest
import torch

from tasks.train.checkpoint import state_dict_sha256

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
        two_split_dataset, tiny_config, val_iou_of, tmp_path) -> None:
    _require_horovod()
    from tasks.train.horovod_backend import launch_local

    # channels_last: the gradients Horovod averages are then dense but not contiguous.
    config = tiny_config("horovod-test", device="cpu", amp="off", channels_last=True)
    result = launch_local(config, nproc=2, timeout_s=300)

    assert (result.world_size, result.epochs_run, result.start_epoch) == (2, 2, 1)
    hashes = [(tmp_path / "run" / f"weights-rank{r}.sha256").read_text().strip() for r in range(2)]
    assert hashes[0] == hashes[1] == result.weights_sha256
    assert state_dict_sha256(torch.load(tmp_path / "run" / "model.pt", weights_only=True)) == hashes[0]
    # Each epoch: eight samples split 4 + 4 over the two workers, two steps of two on each.
    assert [h["images"] for h in result.history] == [8, 8]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("horovod-test").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
    history = client.get_metric_history(result.mlflow_run_id, "val_iou")
    assert sorted(m.step for m in history) == [1, 2]
    for metric in ("train_loss", "val_loss", "lr"):
        assert len(client.get_metric_history(result.mlflow_run_id, metric)) == 2
    # The logged IoU covers both val images although each worker validated only one of them.
    logged = {m.step: m.value for m in history}
    assert logged[2] == pytest.approx(result.metrics["val_iou"])
    expected = val_iou_of(tmp_path / "run" / "model.pt", two_split_dataset, str(tmp_path / "cache"))
    assert logged[2] == pytest.approx(expected, abs=1e-6)
