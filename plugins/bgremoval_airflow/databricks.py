"""Airflow-side glue for training on a Databricks GPU cluster.

The training DAG submits one Databricks run with ``DatabricksSubmitRunOperator(json=submit_run_json(params,
config_json), deferrable=True)``: a new job cluster on an ML GPU runtime, the project's wheel as a cluster
library, and a ``spark_python_task`` whose file is the tiny launcher
:data:`tasks.train.distributor.LAUNCHER_SOURCE` (uploaded once, see :func:`launcher_source`). The
launcher calls :func:`tasks.train.distributor.main`, which trains with Spark's ``TorchDistributor`` on
``num_workers × processes_per_worker`` GPUs. When the run has ended, a downstream task calls
:func:`read_train_result` on the config's ``output_url`` to get rank 0's ``result.json`` — and from it
the MLflow run id (:func:`mlflow_run_id_from_result`).

Credentials never travel in the run's parameters (they are visible in the Databricks UI): the
cluster reaches S3 through an instance profile (``databricks_instance_profile_arn``) and MLflow
through ``MLFLOW_TRACKING_URI`` (``databricks``: the workspace's own tracking server).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from airflow.sdk import Param

DATABRICKS_CONN_ID = "databricks_default"

__all__ = [
    "DATABRICKS_CONN_ID",
    "DEFAULT_LAUNCHER_PATH",
    "DEFAULT_WHEEL_PATH",
    "databricks_params",
    "idempotency_token",
    "launcher_source",
    "mlflow_run_id_from_result",
    "num_processes",
    "read_train_result",
    "submit_run_json",
    "try_token",
]

#: Where the deploy step uploads :data:`tasks.train.distributor.LAUNCHER_SOURCE`: a Unity Catalog
#: volume (current Databricks runtimes refuse libraries and init files from the DBFS root).
DEFAULT_LAUNCHER_PATH = "/Volumes/main/bgremoval/artifacts/train_entry.py"
#: Where the deploy step uploads the project's wheel (``python -m build --wheel``).
DEFAULT_WHEEL_PATH = "/Volumes/main/bgremoval/artifacts/wheels/bgremoval-0.1.0-py3-none-any.whl"

# storage_options keys that hold secrets: they must not be sent in a run's parameters.
_SECRET_KEYS = re.compile(r"(secret|password|token|^key$|access_key|session)", re.IGNORECASE)


#: The trigger-form section of these Params.
DATABRICKS_SECTION = "Databricks"


def databricks_params() -> dict[str, Param]:
    """Params of the Databricks training backend (the job cluster and how to reach it).

    Keys: ``databricks_spark_version``, ``databricks_node_type_id``,
    ``databricks_num_workers``, ``databricks_processes_per_worker``, ``databricks_wheel_path``,
    ``databricks_python_file``, ``databricks_mlflow_tracking_uri``,
    ``databricks_instance_profile_arn`` and ``databricks_timeout_minutes``; every one carries a
    title and a description for the trigger form.
    """
    return {
        "databricks_spark_version": Param(
            "16.4.x-gpu-ml-scala2.12",
            type="string",
            pattern=r"^\S+-ml-\S+$",
            title="Databricks runtime",
            description="An ML runtime (it ships pyspark's TorchDistributor, torch and MLflow). A '-gpu-ml-' "
            "runtime trains on the GPUs with NCCL; a '-cpu-ml-' one trains on the CPUs with gloo.",
            section=DATABRICKS_SECTION,
        ),
        "databricks_node_type_id": Param(
            "g5.2xlarge",
            type="string",
            minLength=1,
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            title="Worker instance type",
            description="Instance type of the driver and every worker, e.g. g5.2xlarge (1 × A10G) or "
            "g5.12xlarge (4 × A10G).",
            section=DATABRICKS_SECTION,
        ),
        "databricks_num_workers": Param(
            4,
            type="integer",
            minimum=0,
            maximum=64,
            title="Workers",
            description="Worker nodes of the job cluster. 0 starts a single-node cluster that trains on "
            "the driver's GPUs.",
            section=DATABRICKS_SECTION,
        ),
        "databricks_processes_per_worker": Param(
            1,
            type="integer",
            minimum=1,
            maximum=16,
            title="GPUs (training processes) per worker",
            description="One training process per GPU: set this to the GPUs of the instance type. The run "
            "trains on workers × this many processes.",
            section=DATABRICKS_SECTION,
        ),
        "databricks_wheel_path": Param(
            DEFAULT_WHEEL_PATH,
            type="string",
            pattern=r"^(dbfs:/|/Volumes/|/Workspace/|s3://|abfss://|gs://)\S+\.whl$",
            title="Project wheel",
            description="The bgremoval wheel, installed on the cluster as a library: a dbfs:/, "
            "/Volumes/... or /Workspace/... path (or cloud storage URL) of bgremoval-<version>-py3-none-any.whl.",
            section=DATABRICKS_SECTION,
        ),
        "databricks_python_file": Param(
            DEFAULT_LAUNCHER_PATH,
            type="string",
            pattern=r"^(dbfs:/|/Volumes/|/Workspace/|s3://|abfss://|gs://)\S+\.py$",
            title="Launcher file",
            description="The spark_python_task file: the three-line launcher of tasks.train.distributor "
            "(LAUNCHER_SOURCE), uploaded next to the wheel.",
            section=DATABRICKS_SECTION,
        ),
        "databricks_mlflow_tracking_uri": Param(
            "databricks",
            type="string",
            pattern=r"^$|^databricks(://[A-Za-z0-9._-]+)?$|^https?://\S+$|^sqlite:///\S+$",
            title="MLflow tracking URI on the cluster",
            description="MLFLOW_TRACKING_URI of the training run: 'databricks' logs to the workspace's MLflow, "
            "an https:// URL to a tracking server the cluster can reach. Empty: the cluster's default.",
            section=DATABRICKS_SECTION,
        ),
        "databricks_instance_profile_arn": Param(
            "",
            type="string",
            pattern=r"^$|^arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/\S+$",
            title="Instance profile ARN",
            description="Optional: the AWS instance profile that gives the cluster access to the S3 bucket "
            "(no keys are sent with the run).",
            section=DATABRICKS_SECTION,
        ),
        "databricks_timeout_minutes": Param(
            360,
            type="integer",
            minimum=10,
            maximum=7 * 24 * 60,
            title="Run timeout (minutes)",
            description="Databricks cancels the run (and its cluster) after this long.",
            section=DATABRICKS_SECTION,
        ),
    }


def _uses_gpu(spark_version: str) -> bool:
    return "-gpu-" in spark_version or spark_version.startswith("gpu-")


def num_processes(params: dict) -> int:
    """Training processes of the run: ``num_workers × processes_per_worker`` (the driver's share
    on a single-node cluster)."""
    workers = int(params["databricks_num_workers"])
    return max(workers, 1) * int(params["databricks_processes_per_worker"])


def _check_config(config_json: str) -> None:
    """Fail in Airflow, before a cluster is paid for, when the config is invalid or holds secrets."""
    from tasks.train.config import TrainConfig

    config = TrainConfig.from_json(config_json)  # raises ValueError naming the bad field
    secrets = sorted(k for k in (config.storage_options or {}) if _SECRET_KEYS.search(str(k)))
    if secrets:
        raise ValueError(
            f"the training config's storage_options hold credentials ({', '.join(secrets)}), which would be "
            "visible in the Databricks run's parameters: leave them out and give the cluster an instance "
            "profile (databricks_instance_profile_arn) or Databricks secrets instead")


def idempotency_token(dag_id: str, run_id: str, output_url: str = "") -> str:
    """The ``idempotency_token`` of a DAG run's training submission (at most 64 characters, the
    Jobs API's limit, with :func:`try_token`'s suffix): a submission sent twice (the hook's own
    retries) gets the run the first one started instead of a second GPU cluster. ``output_url`` (the
    training run's folder, which names the dataset version) is part of it: the DAG run cleared with
    new raw files trains the new version instead of following the old version's run."""
    return "bgremoval-" + hashlib.sha256(f"{dag_id}\n{run_id}\n{output_url}".encode()).hexdigest()[:48]


def try_token(token: str, try_number: int) -> str:
    """The token one try of ``train_on_databricks`` submits with: a retry, or the task cleared after a
    failed cluster run, is a new try and starts a new run (Databricks answers a token it has seen
    with that run, ended or not)."""
    return f"{token}-{int(try_number)}"


def submit_run_json(params: dict, config_json: str, idempotency_token: str | None = None) -> dict[str, Any]:
    """Return the Jobs API 2.2 ``runs/submit`` payload that trains ``config_json`` on a new cluster.

    Args:
        params: the DAG run's params (the keys of :func:`databricks_params`; extra keys are ignored).
        config_json: the :class:`~tasks.train.config.TrainConfig` as JSON (``TrainConfig.to_json()``).
        idempotency_token: sent as the payload's ``idempotency_token`` when given (see
            :func:`idempotency_token`): Databricks answers a second submission with the same token
            with the first one's run id instead of starting another run.

    The payload has one task ``train``: a ``new_cluster`` from the params (``spark.task.resource.gpu.amount``
    1 on a GPU runtime, so TorchDistributor runs one process per GPU; single-node settings when
    ``databricks_num_workers`` is 0), the wheel as its only library, and a ``spark_python_task`` running
    the launcher with ``--config-json <config> --num-processes <workers × processes_per_worker>``,
    plus ``--use-gpu`` on a GPU runtime and ``--local-mode`` on a single node. Raises ``ValueError``
    when the config is invalid or its ``storage_options`` hold credentials.
    """
    _check_config(config_json)
    spark_version = str(params["databricks_spark_version"])
    workers = int(params["databricks_num_workers"])
    gpu = _uses_gpu(spark_version)
    spark_conf: dict[str, str] = {}
    custom_tags: dict[str, str] = {"project": "bgremoval"}
    if gpu:
        spark_conf["spark.task.resource.gpu.amount"] = "1"
    if workers == 0:
        spark_conf.update({"spark.master": "local[*, 4]", "spark.databricks.cluster.profile": "singleNode"})
        custom_tags["ResourceClass"] = "SingleNode"
    env: dict[str, str] = {}
    tracking_uri = str(params.get("databricks_mlflow_tracking_uri") or "")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    cluster: dict[str, Any] = {
        "spark_version": spark_version,
        "node_type_id": str(params["databricks_node_type_id"]),
        "num_workers": workers,
        "spark_conf": spark_conf,
        "spark_env_vars": env,
        "custom_tags": custom_tags,
    }
    profile = str(params.get("databricks_instance_profile_arn") or "")
    if profile:
        cluster["aws_attributes"] = {"instance_profile_arn": profile}
    arguments = ["--config-json", config_json, "--num-processes", str(num_processes(params))]
    if gpu:
        arguments.append("--use-gpu")
    if workers == 0:
        arguments.append("--local-mode")
    config = json.loads(config_json)
    token = {} if idempotency_token is None else {"idempotency_token": idempotency_token}
    return {
        **token,
        "run_name": f"bgremoval-train {config.get('mlflow_run_name') or config['output_url']}"[:4096],
        "timeout_seconds": int(params.get("databricks_timeout_minutes", 360)) * 60,
        "tasks": [
            {
                "task_key": "train",
                "new_cluster": cluster,
                "libraries": [{"whl": str(params["databricks_wheel_path"])}],
                "spark_python_task": {"python_file": str(params["databricks_python_file"]), "parameters": arguments},
            }
        ],
    }


def launcher_source() -> str:
    """Return the launcher file's text, for the deploy step that uploads it to ``databricks_python_file``."""
    from tasks.train.distributor import LAUNCHER_SOURCE

    return LAUNCHER_SOURCE


def read_train_result(output_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Read the training run's ``result.json`` (written by rank 0) from ``<output_url>``; return it as a dict.

    This is how a Databricks run's outcome comes back to Airflow: call it in a task downstream of the
    ``DatabricksSubmitRunOperator`` with the config's ``output_url`` and the storage options of the
    Airflow side (e.g. from ``aws_default``). Raises ``FileNotFoundError`` when the run wrote no result
    (it failed, or wrote elsewhere).
    """
    from tasks.core import layout, storage

    url = layout.train_result(output_url)
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"no training result at {url}: the Databricks run did not finish training, or its "
                                "config's output_url is not this one; see the run page for its log")
    return json.loads(storage.read_bytes(url, storage_options))


def mlflow_run_id_from_result(result: dict[str, Any]) -> str:
    """Return the MLflow run id of a :func:`read_train_result` dict.

    Raises ``ValueError`` when the run logged nothing to MLflow (``mlflow_enabled`` was off)."""
    run_id = result.get("mlflow_run_id")
    if not run_id:
        raise ValueError(f"the training result at {result.get('result_url')} has no MLflow run id "
                         "(was mlflow_enabled false?)")
    return str(run_id)
