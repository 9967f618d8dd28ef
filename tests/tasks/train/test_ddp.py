"""Tests for the ``torch.distributed`` backend: two ``torchrun`` workers on the CPU (gloo).

Each launch starts real processes through :func:`tasks.train.ddp.launch_local`; the model is a
tiny U2-Net at 64 px so a run takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from tasks.train.checkpoint import load_checkpoint
from tasks.train.ddp import launch_local
from tasks.train.faults import kill_env

pytestmark = pytest.mark.process

torch.set_num_threads(1)


def _weights_hashes(tmp_path) -> list[str]:
    return [(tmp_path / "run" / f"weights-rank{r}.sha256").read_text().strip() for r in range(2)]


def test_two_workers_end_with_identical_weights_and_log_averaged_metrics_once(
        tiny_config, check_two_worker_run) -> None:
    check_two_worker_run(launch_local(tiny_config("ddp-test", amp="off"), nproc=2, timeout_s=240), "ddp-test")


def test_a_killed_worker_fails_the_run_and_the_next_launch_resumes(
        tiny_config, tmp_path) -> None:
    # amp="auto": bf16 autocast on a CPU with native bf16, float32 elsewhere.
    with pytest.raises(RuntimeError, match=r"torchrun \(2 workers\) exited with status") as failure:
        launch_local(tiny_config("ddp-test", epochs=3), nproc=2, timeout_s=240, env=kill_env(after_epoch=1, rank=1),
                     log_path=str(tmp_path / "torchrun.log"))  # kept after a failure: in the test's folder, not /tmp
    assert "log tail" in str(failure.value) and f"full log: {tmp_path / 'torchrun.log'}" in str(failure.value)
    assert (tmp_path / "torchrun.log").stat().st_size > 0
    checkpoint = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert checkpoint["epoch"] == 1
    assert not (tmp_path / "run" / "result.json").exists()

    result = launch_local(tiny_config("ddp-test", epochs=3), nproc=2, timeout_s=240)
    assert (result.start_epoch, result.epochs_run, result.epochs_completed, result.resumed) == (2, 2, 3, True)
    assert result.mlflow_run_id == checkpoint["mlflow_run_id"]
    hashes = _weights_hashes(tmp_path)
    assert hashes[0] == hashes[1] == result.weights_sha256

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ddp-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for metric in ("val_iou", "train_loss", "val_loss", "lr"):
        steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, metric)]
        assert sorted(steps) == [1, 2, 3], (metric, steps)
    # Epoch 1 was logged by the first launch, before the worker died, and kept its value.
    first = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "train_loss")}
    assert first[1] == pytest.approx(checkpoint["history"][0]["train_loss"])


def test_relative_local_paths_reach_the_workers_as_absolute_ones(tmp_path, monkeypatch) -> None:
    """The workers run in the project's folder: a path relative to the caller's folder would name
    another file there (or none), so the launcher hands them absolute ones; URLs stay as they are."""
    from tasks.train.config import TrainConfig
    from tasks.train.ddp import _absolute_local_paths

    monkeypatch.chdir(tmp_path)
    config = _absolute_local_paths(TrainConfig(dataset_url="datasets/v1", output_url="runs/r1",
                                               init_from="runs/r1/init/model.pt", cache_dir="s3://b/cache",
                                               mlflow_tracking_uri="sqlite:///mlflow.db",
                                               mlflow_artifact_location="mlflow-artifacts"))
    assert config.mlflow_tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.mlflow_artifact_location == str(tmp_path / "mlflow-artifacts")
    assert config.dataset_url == str(tmp_path / "datasets" / "v1")
    assert config.output_url == str(tmp_path / "runs" / "r1")
    assert config.init_from == str(tmp_path / "runs" / "r1" / "init" / "model.pt")
    assert config.cache_dir == "s3://b/cache"


def test_the_epoch_bars_are_shown_and_everything_is_logged(tmp_path, capsys) -> None:
    """`bgremoval train` shows the workers' epoch bars as they advance; the log keeps every line."""
    import io

    from tasks.train.ddp import _copy_output

    output = (b"W1205 some warning from gloo\nepoch 1/2:  50%|#####     | 8/16 [00:01<00:01, 7.9img/s]\r"
              b"epoch 1/2: 100%|##########| 16/16 [00:02<00:00, 7.9img/s]\n[rank0]: done\n")
    log = tmp_path / "train.log"
    with open(log, "wb") as handle:
        _copy_output(io.BufferedReader(io.BytesIO(output)), handle, echo=True)
    assert log.read_bytes() == output
    shown = capsys.readouterr().err
    assert "epoch 1/2:  50%" in shown and "epoch 1/2: 100%" in shown and "gloo" not in shown and "rank0" not in shown


def test_a_log_that_cannot_be_written_does_not_stop_the_pipe_being_drained(capsys) -> None:
    """With the disk full, the workers must still be able to write: their output keeps being read."""
    import io

    from tasks.train.ddp import _copy_output

    class FullDisk(io.RawIOBase):
        def write(self, data):
            raise OSError(28, "No space left on device")

    output = b"x" * 200_000 + b"\nepoch 1/1: 100%|##########| 4/4\n"
    source = io.BufferedReader(io.BytesIO(output))
    _copy_output(source, FullDisk(), echo=True)
    assert source.read() == b""  # all of it was read
    assert "epoch 1/1: 100%" in capsys.readouterr().err
