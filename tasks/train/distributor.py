"""The Spark backend: :func:`train` under pyspark's ``TorchDistributor`` — what a Databricks GPU
cluster runs.

``TorchDistributor(num_processes=N, local_mode=False, use_gpu=...)`` starts one barrier Spark task
per process group (one per GPU when ``spark.task.resource.gpu.amount`` is 1); every task launches
``torchrun`` for its share of the N processes, which sets ``MASTER_ADDR``/``MASTER_PORT``, ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``. Each process then runs :func:`distributor_worker`, which is
exactly a ``torchrun`` worker of :mod:`tasks.train.ddp` (:func:`~tasks.train.ddp.run_worker`: gloo
on the CPU, NCCL on CUDA, DistributedDataParallel). ``local_mode=True`` runs all N processes on the
driver instead. pyspark in local mode (``local[N]`` master, Java 17) runs the same code here.

Entry point of the Databricks ``spark_python_task`` (the launcher file is :data:`LAUNCHER_SOURCE`)::

    python -m tasks.train.distributor --config-json '<TrainConfig JSON>' --num-processes 4 --use-gpu
    python -m tasks.train.distributor --config s3://bucket/runs/r1/config.json --num-processes 4 --use-gpu

prints ``BGREMOVAL_RESULT <TrainResult JSON>`` as its last line of stdout; rank 0 also writes the
same :class:`~tasks.train.loop.TrainResult` to ``<output_url>/result.json``, which is how Airflow
reads the MLflow run id back after the Databricks run ends.

pyspark is imported lazily: this module imports without it, and the functions that need it raise
an ``ImportError`` that says what to install.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from typing import Any

from tasks.core import layout, storage
from tasks.train.config import COLLECTIVE_TIMEOUT_S, TrainConfig
from tasks.train.loop import TrainResult

__all__ = [
    "LAUNCHER_SOURCE",
    "PYSPARK_REQUIREMENT",
    "RESULT_PREFIX",
    "distributor_worker",
    "format_result_line",
    "main",
    "parse_result_line",
    "require_pyspark",
    "spark_unavailable_reason",
    "train_with_distributor",
]

log = logging.getLogger(__name__)

#: The pyspark release this backend is tested with (Spark 4 needs Java 17 or newer, and pyarrow).
PYSPARK_REQUIREMENT = "pyspark==4.3.0"

#: Prefix of the last stdout line of :func:`main`: ``BGREMOVAL_RESULT <TrainResult JSON>``.
RESULT_PREFIX = "BGREMOVAL_RESULT"

#: The file a Databricks ``spark_python_task`` points at (``python_file``): the project's wheel,
#: installed as a cluster library, holds the code; this launcher only calls :func:`main`.
#: A deploy step uploads it, e.g. to ``/Volumes/main/bgremoval/artifacts/train_entry.py``.
LAUNCHER_SOURCE = '''"""bgremoval training launcher for a Databricks spark_python_task (code: the bgremoval wheel)."""
import sys

from tasks.train.distributor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

# Exit status of main() when the arguments or the training config are invalid.
_USAGE_ERROR = 2


def require_pyspark() -> None:
    """Import pyspark's ``TorchDistributor`` or raise ``ImportError`` saying how to get it.

    On Databricks ML runtimes pyspark is preinstalled; elsewhere install
    :data:`PYSPARK_REQUIREMENT` (it needs Java 17+ on ``PATH`` or ``JAVA_HOME``, and pyarrow)."""
    try:
        from pyspark.ml.torch.distributor import TorchDistributor  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the torch_distributor backend needs pyspark with pyspark.ml.torch (Spark >= 3.4): "
            f"`pip install '{PYSPARK_REQUIREMENT}'` (Java 17+ and pyarrow required); on Databricks use an ML "
            f"runtime, where it is preinstalled. Import failed with: {exc}"
        ) from exc


def spark_unavailable_reason() -> str | None:
    """Return why pyspark cannot run here (pyspark missing, or no Java), or None when it can.

    pyspark starts a JVM: it needs ``java`` under ``$JAVA_HOME/bin`` or on ``PATH`` (Java 17+ for
    Spark 4)."""
    try:
        require_pyspark()
    except ImportError as exc:
        return str(exc)
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return None
    if shutil.which("java") is None:
        return ("pyspark needs Java 17 or newer and finds none: install a JDK (e.g. `apt-get install "
                "openjdk-17-jre-headless`) or set JAVA_HOME")
    return None


def distributor_worker(config_json: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> str:
    """Train as one process of a ``TorchDistributor`` run; the function every Spark task runs.

    ``torchrun`` (started by TorchDistributor) has set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    ``MASTER_ADDR``/``MASTER_PORT``; this runs :func:`tasks.train.ddp.run_worker` (gloo on the CPU,
    NCCL on CUDA). ``timeout_s`` bounds every collective.

    Returns a small JSON summary (``result_url``, ``mlflow_run_id``, ``world_size``) that is the
    same on every process: TorchDistributor returns what the processes of its first Spark task
    return, and when one task runs several processes they all write that same file, so only a
    value identical across ranks is safe. The full result is rank 0's ``result.json``.
    """
    from tasks.train.ddp import run_worker

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainConfig.from_json(config_json)
    result = run_worker(config, timeout_s)
    return json.dumps({"result_url": result.result_url, "mlflow_run_id": result.mlflow_run_id,
                       "world_size": result.world_size}, sort_keys=True)


def train_with_distributor(config: TrainConfig, num_processes: int, use_gpu: bool, local_mode: bool = False,
                           timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TrainResult:
    """Train ``config`` on ``num_processes`` workers with Spark's ``TorchDistributor``; return rank 0's result.

    Args:
        config: the run's :class:`~tasks.train.config.TrainConfig` (sent to every worker as JSON).
        num_processes: total training processes (on a GPU cluster: workers × GPUs per worker).
        use_gpu: one GPU per process (needs ``spark.task.resource.gpu.amount`` set unless
            ``local_mode``); False trains on the CPU with gloo.
        local_mode: run every process on the driver instead of on the executors.
        timeout_s: seconds one collective may wait before the worker fails.

    A SparkSession must be active (``SparkSession.builder.getOrCreate()``; on Databricks it is).
    Returns the :class:`~tasks.train.loop.TrainResult` rank 0 wrote to ``<output_url>/result.json``.
    Raises ``ImportError`` without pyspark, ``ValueError`` for impossible settings and the
    Spark/torchrun error (with the workers' log tail) when training fails.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if use_gpu and config.device == "cpu":
        raise ValueError("use_gpu=True but config.device is 'cpu': set device='auto' or 'cuda', or use_gpu=False")
    if not use_gpu and config.device == "cuda":
        raise ValueError("config.device is 'cuda' but use_gpu=False (TorchDistributor hides the GPUs): "
                         "set use_gpu=True or device='auto'")
    require_pyspark()
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession() is None:
        raise RuntimeError("train_with_distributor needs an active SparkSession: create one with "
                           "SparkSession.builder.master('local[2]').getOrCreate() (Databricks provides one)")
    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    log.info("TorchDistributor: %d processes, local_mode=%s, use_gpu=%s, output %s", num_processes, local_mode,
             use_gpu, config.output_url)
    returned = distributor.run(distributor_worker, config.to_json(), float(timeout_s))
    summary = json.loads(returned) if isinstance(returned, str) else {}
    result_url = summary.get("result_url") or layout.train_result(config.output_url)
    result = TrainResult.from_dict(json.loads(storage.read_bytes(result_url, config.storage_options or None)))
    if summary and (summary.get("mlflow_run_id") != result.mlflow_run_id
                    or summary.get("world_size") != result.world_size):
        raise RuntimeError(f"{result_url} does not belong to this run (workers reported {summary}, the file says "
                           f"MLflow run {result.mlflow_run_id} with {result.world_size} workers): another run "
                           "wrote to the same output_url")
    return result


def format_result_line(result: TrainResult) -> str:
    """Return the ``BGREMOVAL_RESULT <json>`` line :func:`main` prints last."""
    return f"{RESULT_PREFIX} {json.dumps(result.to_dict(), sort_keys=True)}"


def parse_result_line(output: str) -> dict[str, Any]:
    """Return the result dict from the last ``BGREMOVAL_RESULT`` line of a run's stdout.

    Raises ``ValueError`` when there is none (the run failed before printing it)."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX + " "):
            return json.loads(line[len(RESULT_PREFIX) + 1:])
    raise ValueError(f"no '{RESULT_PREFIX} ' line in the output")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.train.distributor",
        description="Train the bgremoval model with Spark's TorchDistributor (the Databricks entry point).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="path or URL (fsspec: s3://, dbfs paths as /dbfs/...) of a TrainConfig "
                                         "JSON file")
    source.add_argument("--config-json", help="the TrainConfig as JSON text")
    parser.add_argument("--num-processes", type=int, required=True,
                        help="training processes in total (workers × GPUs per worker)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per process (NCCL); default: CPU (gloo)")
    parser.add_argument("--local-mode", action="store_true", help="run every process on the driver")
    parser.add_argument("--master", help="Spark master for a session created here, e.g. local[2] "
                                         "(default: the cluster's session, or Spark's default)")
    parser.add_argument("--timeout", type=float, default=COLLECTIVE_TIMEOUT_S,
                        help="seconds a collective may wait (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line of the Databricks ``spark_python_task``: train and report the result.

    Gets (or creates) the SparkSession, runs :func:`train_with_distributor`, and prints
    ``BGREMOVAL_RESULT <TrainResult JSON>`` as the last line of stdout (``result.json`` under the
    config's ``output_url`` holds the same). Returns 0 on success and 2 when the arguments or the
    config are invalid (the reason goes to stderr); a training failure raises, so the Spark job
    and the Databricks run fail with its traceback.
    """
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        text = args.config_json if args.config_json is not None else storage.read_bytes(args.config).decode("utf-8")
        config = TrainConfig.from_json(text)
    except (ValueError, TypeError, OSError) as exc:
        print(f"bgremoval: invalid training config: {exc}", file=sys.stderr, flush=True)
        return _USAGE_ERROR
    if args.num_processes < 1:
        print(f"bgremoval: --num-processes must be >= 1, got {args.num_processes}", file=sys.stderr, flush=True)
        return _USAGE_ERROR
    require_pyspark()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("bgremoval-train")
    if args.master:
        builder = builder.master(args.master)
        if args.master.startswith("local"):
            # Spark's python workers default to `python3` on PATH: use this interpreter (the venv).
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    spark = builder.getOrCreate()
    try:
        result = train_with_distributor(config, args.num_processes, args.use_gpu, args.local_mode, args.timeout)
    finally:
        if args.master:  # a session this process created; never stop a cluster's shared session
            spark.stop()
    print(format_result_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
