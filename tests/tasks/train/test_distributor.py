"""Tests for the Spark backend: ``TorchDistributor`` on a ``local[2]`` SparkSession (CPU, gloo).

The Spark test starts a real JVM and two barrier tasks, each of which launches ``torchrun`` for one
training process; the model is a tiny U2-Net at 32 px. Without pyspark or Java the Spark test is
skipped with the reason, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.train.config import TrainConfig
from tasks.train.distributor import (
    LAUNCHER_SOURCE,
    RESULT_PREFIX,
    format_result_line,
    main,
    parse_result_line,
    spark_unavailable_reason,
    train_with_distributor,
)
from tasks.train.loop import TrainResult
from tasks.dev.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.process

TINY = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}


def require_spark() -> None:
    """Skip (fail under CI=true) when pyspark or Java is missing."""
    reason = spark_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the Spark backend cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def spark():
    """A ``local[2]`` SparkSession whose python workers are this interpreter; stopped afterwards."""
    require_spark()
    with pytest.MonkeyPatch.context() as patch:
        # Read when the JVM and its python workers start: set before getOrCreate().
        patch.setenv("PYSPARK_PYTHON", sys.executable)
        patch.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        patch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        patch.setenv("OMP_NUM_THREADS", "1")  # two training processes on two cores
        from pyspark.sql import SparkSession

        session = (SparkSession.builder.master("local[2]").appName("bgremoval-test-distributor")
                   .config("spark.ui.enabled", "false").getOrCreate())
        session.sparkContext.setLogLevel("ERROR")
        try:
            yield session
        finally:
            session.stop()


def _config(tmp_path, dataset: str, **changes) -> TrainConfig:
    values = dict(dataset_url=dataset, output_url=str(tmp_path / "run"), model="u2netp", model_widths=TINY,
                  epochs=2, batch_size=2, input_size=32, lr=3e-3, amp="off", cache_dir=str(tmp_path / "cache"),
                  mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", mlflow_experiment="distributor-test",
                  tensorboard=False, log_system_metrics=False)
    values.update(changes)
    return TrainConfig(**values)


def test_two_spark_tasks_train_one_model_and_log_one_mlflow_run(spark, tmp_path) -> None:
    dataset = str(tmp_path / "datasets" / "v1")
    # Eight 48-px products: six train, two val.
    write_synthetic_dataset(dataset, 8, seed=4, max_side=48, split_for=lambda i: "val" if i in (1, 6) else "train")

    result = train_with_distributor(_config(tmp_path, dataset), num_processes=2, use_gpu=False, local_mode=False)

    assert isinstance(result, TrainResult)
    assert (result.world_size, result.epochs_run, result.device) == (2, 2, "cpu")
    hashes = [(tmp_path / "run" / f"weights-rank{r}.sha256").read_text().strip() for r in range(2)]
    assert hashes[0] == hashes[1] == result.weights_sha256
    # Six train samples, three per worker, one step of two each: four images an epoch.
    assert [h["images"] for h in result.history] == [4, 4]
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result.to_dict()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("distributor-test").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
    val_iou = client.get_metric_history(result.mlflow_run_id, "val_iou")
    assert sorted(m.step for m in val_iou) == [1, 2]
    assert {m.step: m.value for m in val_iou}[2] == pytest.approx(result.metrics["val_iou"])


def test_settings_that_cannot_work_fail_before_spark_starts(tmp_path) -> None:
    config = _config(tmp_path, str(tmp_path / "missing"), device="cuda")
    with pytest.raises(ValueError, match="use_gpu=False"):
        train_with_distributor(config, num_processes=2, use_gpu=False)
    with pytest.raises(ValueError, match="num_processes must be >= 1"):
        train_with_distributor(_config(tmp_path, str(tmp_path / "missing")), num_processes=0, use_gpu=False)


def test_entry_point_rejects_a_bad_config_with_a_reason_and_status_2(tmp_path, capsys) -> None:
    bad = json.dumps({"dataset_url": "x", "output_url": "y", "epochs": 0})
    assert main(["--config-json", bad, "--num-processes", "2"]) == 2
    assert "invalid training config: epochs must be a positive integer" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "absent.json"), "--num-processes", "2"]) == 2
    assert "invalid training config" in capsys.readouterr().err


def test_result_line_round_trips() -> None:
    result = TrainResult.from_dict({
        "model": "u2netp", "epochs": 1, "epochs_completed": 1, "epochs_run": 1, "start_epoch": 1, "resumed": False,
        "metrics": {"val_iou": 0.5}, "history": [], "batch_size": 2, "world_size": 2, "device": "cpu", "amp": "off",
        "n_train": 6, "n_val": 2, "images_per_s": 1.0, "output_url": "o", "checkpoint_url": "o/c", "model_url": "o/m",
        "result_url": "o/result.json", "weights_sha256": "ab", "mlflow_run_id": "r1"})
    output = f"some log\n{format_result_line(result)}\n"
    assert output.splitlines()[-1].startswith(RESULT_PREFIX + " ")
    assert parse_result_line(output)["mlflow_run_id"] == "r1"
    with pytest.raises(ValueError, match=RESULT_PREFIX):
        parse_result_line("Traceback ...\n")


def test_launcher_file_runs_the_entry_point(tmp_path) -> None:
    launcher = tmp_path / "train_entry.py"
    launcher.write_text(LAUNCHER_SOURCE)
    bad = json.dumps({"dataset_url": "d", "output_url": "o", "model": "u3net"})
    done = subprocess.run([sys.executable, str(launcher), "--config-json", bad, "--num-processes", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "invalid training config: model must be one of" in done.stderr
