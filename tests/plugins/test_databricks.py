"""The Databricks training backend from Airflow's side: the runs/submit payload, and a deferrable
``DatabricksSubmitRunOperator`` run by ``dag.test()`` against a local Jobs API 2.2 server that really
runs the submitted ``spark_python_task`` (the launcher → ``tasks.train.distributor.main`` →
TorchDistributor on ``local[2]``).

The end-to-end tests need pyspark and Java: without them they are skipped with the reason, except
under ``CI=true``, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from datetime import timedelta
from pathlib import Path

import pendulum
import pytest

from bgremoval_airflow.databricks import (
    DEFAULT_LAUNCHER_PATH,
    DEFAULT_WHEEL_PATH,
    databricks_params,
    idempotency_token,
    launcher_source,
    mlflow_run_id_from_result,
    num_processes,
    read_train_result,
    submit_run_json,
    try_token,
)
from tasks.train.config import TrainConfig
from tasks.train.distributor import spark_unavailable_reason
from tasks.dev.synthetic import write_synthetic_dataset

TINY = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _server_module():
    """Import tests/plugins/jobs_api_server.py (the tests folder is not a package)."""
    path = Path(__file__).with_name("jobs_api_server.py")
    spec = importlib.util.spec_from_file_location("bgremoval_test_jobs_api_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


jobs_api = _server_module()


def _defaults() -> dict:
    return {name: param.value for name, param in databricks_params().items()}


def _config_json(tmp_path: Path, **changes) -> str:
    values = dict(dataset_url=str(tmp_path / "datasets" / "v1"), output_url=str(tmp_path / "run"), model="u2netp",
                  model_widths=TINY, epochs=2, batch_size=2, input_size=32, lr=3e-3, amp="off",
                  cache_dir=str(tmp_path / "cache"), mlflow_experiment="databricks-test", tensorboard=False,
                  log_system_metrics=False)
    values.update(changes)
    return TrainConfig(**values).to_json()


# ----------------------------------------------------------------------------------------------
# The payload
# ----------------------------------------------------------------------------------------------

def test_params_are_form_ready_and_default_to_a_gpu_cluster() -> None:
    params = databricks_params()
    for name, param in params.items():
        assert param.schema.get("title") and param.description, name
    defaults = _defaults()
    assert defaults["databricks_spark_version"] == "16.4.x-gpu-ml-scala2.12"
    assert (defaults["databricks_node_type_id"], defaults["databricks_num_workers"]) == ("g5.2xlarge", 4)
    assert defaults["databricks_processes_per_worker"] == 1
    assert defaults["databricks_python_file"] == DEFAULT_LAUNCHER_PATH
    for name, param in params.items():
        param.resolve(defaults[name])  # every default passes its own schema


def test_default_payload_trains_on_every_gpu_of_the_cluster(tmp_path) -> None:
    config_json = _config_json(tmp_path)
    payload = submit_run_json({**_defaults(), "databricks_processes_per_worker": 2}, config_json)

    jobs_api.validate_submit_payload(payload)
    (task,) = payload["tasks"]
    assert task["task_key"] == "train"
    cluster = task["new_cluster"]
    assert (cluster["spark_version"], cluster["node_type_id"], cluster["num_workers"]) == (
        "16.4.x-gpu-ml-scala2.12", "g5.2xlarge", 4)
    assert cluster["spark_conf"] == {"spark.task.resource.gpu.amount": "1"}
    assert cluster["spark_env_vars"] == {"MLFLOW_TRACKING_URI": "databricks"}
    assert "aws_attributes" not in cluster
    assert task["libraries"] == [{"whl": "/Volumes/main/bgremoval/artifacts/wheels/bgremoval-0.1.0-py3-none-any.whl"}]
    assert task["spark_python_task"] == {
        "python_file": DEFAULT_LAUNCHER_PATH,
        "parameters": ["--config-json", config_json, "--num-processes", "8", "--use-gpu"],
    }
    assert payload["timeout_seconds"] == 360 * 60


def test_zero_workers_is_a_single_node_cluster_training_on_the_driver(tmp_path) -> None:
    params = {**_defaults(), "databricks_num_workers": 0, "databricks_processes_per_worker": 4,
              "databricks_node_type_id": "g5.12xlarge",
              "databricks_instance_profile_arn": "arn:aws:iam::1:instance-profile/x"}
    assert num_processes(params) == 4
    task = submit_run_json(params, _config_json(tmp_path))["tasks"][0]
    assert task["new_cluster"]["spark_conf"]["spark.databricks.cluster.profile"] == "singleNode"
    assert task["new_cluster"]["custom_tags"]["ResourceClass"] == "SingleNode"
    assert task["new_cluster"]["aws_attributes"] == {"instance_profile_arn": "arn:aws:iam::1:instance-profile/x"}
    assert task["spark_python_task"]["parameters"][-4:] == ["--num-processes", "4", "--use-gpu", "--local-mode"]


def test_payload_refuses_invalid_configs_and_credentials(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        submit_run_json(_defaults(), json.dumps({"dataset_url": "s3://b/d", "output_url": "s3://b/o", "epoch": 3}))
    with_keys = _config_json(tmp_path, storage_options={"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {}})
    with pytest.raises(ValueError, match=r"credentials \(key, secret\)"):
        submit_run_json(_defaults(), with_keys)
    assert "from tasks.train.distributor import main" in launcher_source()


def test_reading_the_result_of_a_run_that_wrote_none_says_so(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="did not finish training"):
        read_train_result(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="no MLflow run id"):
        mlflow_run_id_from_result({"mlflow_run_id": None, "result_url": "x"})


# ----------------------------------------------------------------------------------------------
# The operator against the local Jobs API server
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spark_backend() -> None:
    """Skips the module's cluster tests without pyspark and Java (fails them under ``CI=true``),
    before anything is built for them."""
    reason = spark_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the Spark backend cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster_runtime(spark_backend, tmp_path_factory, uv) -> Path:
    """A fresh virtual environment standing for the Databricks ML runtime: its preinstalled packages
    (torch, pyspark, MLflow, pandas, as on the runtime) are this environment's, on its ``sys.path``
    through a ``.pth`` file; bgremoval is not there until a run installs the wheel. Returns its
    ``python``."""
    tool, env = uv
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    subprocess.run([tool, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=env)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=env).stdout.strip())
    (site / "databricks_runtime.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory, cluster_runtime, project_wheel, uv):
    """The fake Jobs API with the launcher "uploaded" at the default python_file path and the
    project's wheel at the default library path, installed into :func:`cluster_runtime` by each run."""
    folder = tmp_path_factory.mktemp("dbfs")
    launcher = folder / "train_entry.py"
    launcher.write_text(launcher_source())
    tool, env = uv
    server = jobs_api.FakeJobsServer(
        python_files={DEFAULT_LAUNCHER_PATH: str(launcher)}, token="dapi-test", cores=2,
        extra_env={"SPARK_LOCAL_IP": "127.0.0.1", "OMP_NUM_THREADS": "1"},
        cluster_python=str(cluster_runtime), libraries={DEFAULT_WHEEL_PATH: str(project_wheel)},
        install_command=[tool, "pip", "install", "--quiet", "--python", str(cluster_runtime), "-c",
                         str(PROJECT_ROOT / "constraints.txt")],
        cluster_env=env)
    with server:
        yield server


def _run_submit_dag(dag_id: str, payload: dict, output_url: str, retries: int = 0):
    """Run a DAG of the training DAG's deferrable submit operator and a task that reads the result
    back; return ``(dag_run, exceptions the operator failed with)``."""
    from airflow.sdk import DAG, task

    from bgremoval_airflow.operators import TrainOnDatabricks

    failures: list[BaseException] = []

    @task
    def read_result() -> dict:
        result = read_train_result(output_url)
        return {"mlflow_run_id": mlflow_run_id_from_result(result), "val_iou": result["metrics"]["val_iou"]}

    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False) as dag:
        train = TrainOnDatabricks(
            task_id="train", json=payload, deferrable=True, databricks_conn_id="databricks_default",
            polling_period_seconds=1, databricks_retry_limit=2, databricks_retry_delay=1,
            execution_timeout=timedelta(minutes=5), retries=retries, retry_delay=timedelta(0),
            on_failure_callback=lambda context: failures.append(context.get("exception")),
        )
        train >> read_result()
    _register(dag)
    return dag.test(), failures


def _register(dag) -> None:
    """Store the serialized DAG in the metadata DB, as the DAG processor would (dag.test() needs it)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.collection import update_dag_parsing_results_in_db
    from airflow.serialization.serialized_objects import LazyDeserializedDAG
    from airflow.utils.session import create_session

    DagBundlesManager().sync_bundles_to_db()
    with create_session() as session:
        update_dag_parsing_results_in_db("dags-folder", None, [LazyDeserializedDAG.from_dag(dag)], {}, None, set(),
                                         session=session)


@pytest.mark.process
def test_a_retried_submission_with_the_run_token_gets_the_first_run(jobs_server, tmp_path, monkeypatch) -> None:
    from airflow.providers.databricks.hooks.databricks import DatabricksHook

    monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", jobs_server.connection_uri_json())
    params = {**_defaults(), "databricks_python_file": "dbfs:/FileStore/nowhere/train_entry.py"}  # starts no process
    token = idempotency_token("bgremoval_training", "manual__2026-12-03T10:00:00+00:00")
    assert token == idempotency_token("bgremoval_training", "manual__2026-12-03T10:00:00+00:00") and len(token) <= 64
    assert len(try_token(token, 99)) <= 64
    # the same DAG run cleared with new raw files trains the new dataset version: another token
    assert (idempotency_token("bgremoval_training", "r", "s3://b/training/v1/r")
            != idempotency_token("bgremoval_training", "r", "s3://b/training/v2/r"))
    payload = submit_run_json(params, _config_json(tmp_path), token)
    assert payload["idempotency_token"] == token and "idempotency_token" not in submit_run_json(params, _config_json(tmp_path))
    hook = DatabricksHook("databricks_default", retry_limit=1, retry_delay=1)
    first, retried = hook.submit_run(payload), hook.submit_run(payload)
    other = hook.submit_run(submit_run_json(params, _config_json(tmp_path), idempotency_token("bgremoval_training", "b")))
    assert first == retried != other
    assert sum(s.get("idempotency_token") == token for s in jobs_server.submissions) == 1


@pytest.mark.process
def test_a_retry_follows_the_run_still_going_and_starts_anew_after_a_failed_one(tmp_path, monkeypatch) -> None:
    from airflow.providers.databricks.hooks.databricks import DatabricksHook

    from bgremoval_airflow.operators import TrainOnDatabricks

    entry = tmp_path / "entry.py"
    entry.write_text("import sys, time\ntime.sleep(3)\nsys.exit(1)\n")  # a cluster run that fails after a while
    with jobs_api.FakeJobsServer(python_files={"dbfs:/FileStore/t/entry.py": str(entry)}, token="dapi-test") as server:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", server.connection_uri_json())
        token = idempotency_token("bgremoval_training", "manual__1")
        payload = submit_run_json({**_defaults(), "databricks_python_file": "dbfs:/FileStore/t/entry.py"},
                                  _config_json(tmp_path), token)
        train = TrainOnDatabricks(task_id="train", json=payload, databricks_conn_id="databricks_default",
                                  deferrable=True, databricks_retry_limit=1, databricks_retry_delay=1)
        # try 1 submitted, then its worker was lost: try 2 follows that run while it goes
        first = DatabricksHook("databricks_default").submit_run({**payload, "idempotency_token": try_token(token, 1)})
        assert train.token_for_try(token, 1, {}) == try_token(token, 1)
        assert train.token_for_try(token, 2, {}) == try_token(token, 1) and len(server.submissions) == 1
        # try 2 followed it and was lost too: try 3 still follows the same run, starts no second one
        assert train.token_for_try(token, 3, {}) == try_token(token, 1) and len(server.submissions) == 1
        assert server.wait_for_run(first, 30).result_state == "FAILED"
        assert train.token_for_try(token, 2, {}) == try_token(token, 2)  # it failed: try 2 starts anew
        assert len(server.submissions) == 1  # asking about try 1's run started nothing
        # try 3 after try 2 had followed the failed run: the one new run, under try 2's unused token
        assert train.token_for_try(token, 3, {}) == try_token(token, 2) and len(server.submissions) == 2
        assert train.token_for_try(token, 3, {}) == try_token(token, 2) and len(server.submissions) == 2


@pytest.mark.integration
def test_deferrable_operator_trains_on_the_cluster_and_the_mlflow_run_id_comes_back(
        airflow_db, jobs_server, cluster_runtime, project_wheel, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", jobs_server.connection_uri_json())
    write_synthetic_dataset(str(tmp_path / "datasets" / "v1"), 8, seed=6, max_side=48,
                            split_for=lambda i: "val" if i in (0, 5) else "train")
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    # A single-node CPU cluster training two processes on its driver (TorchDistributor local_mode): the
    # multi-worker mode (local_mode=False) is covered by tests/tasks/train/test_distributor.py.
    params = {**_defaults(), "databricks_spark_version": "16.4.x-cpu-ml-scala2.12",
              "databricks_node_type_id": "m5d.xlarge", "databricks_num_workers": 0,
              "databricks_processes_per_worker": 2,
              "databricks_mlflow_tracking_uri": tracking_uri}
    config_json = _config_json(tmp_path)  # no tracking URI: the cluster's MLFLOW_TRACKING_URI applies
    payload = submit_run_json(params, config_json)

    run, failures = _run_submit_dag("databricks_submit_ok", payload, str(tmp_path / "run"))

    assert failures == []
    (submitted,) = [s for s in jobs_server.submissions if s["run_name"] == payload["run_name"]]
    task = submitted["tasks"][0]
    # On the wire numbers are strings: the provider's normalise_json_content converts them.
    assert task["new_cluster"] == {"spark_version": "16.4.x-cpu-ml-scala2.12", "node_type_id": "m5d.xlarge",
                                   "num_workers": "0",
                                   "spark_conf": {"spark.master": "local[*, 4]",
                                                  "spark.databricks.cluster.profile": "singleNode"},
                                   "spark_env_vars": {"MLFLOW_TRACKING_URI": tracking_uri},
                                   "custom_tags": {"project": "bgremoval", "ResourceClass": "SingleNode"}}
    assert task["libraries"] == [{"whl": params["databricks_wheel_path"]}]
    assert task["spark_python_task"] == {"python_file": DEFAULT_LAUNCHER_PATH,
                                         "parameters": ["--config-json", config_json, "--num-processes", "2",
                                                        "--local-mode"]}
    fake_run = next(r for r in jobs_server.runs.values() if r.payload is submitted)
    assert (fake_run.life_cycle_state, fake_run.result_state, fake_run.returncode) == ("TERMINATED", "SUCCESS", 0), \
        fake_run.stderr[-3000:]
    assert fake_run.stdout.rstrip().splitlines()[-1].startswith("BGREMOVAL_RESULT ")

    assert run.state == "success"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"train": "success", "read_result": "success"}
    returned = next(ti for ti in run.get_task_instances() if ti.task_id == "read_result").xcom_pull(
        task_ids="read_result")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    mlflow_run = client.get_run(returned["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["world_size"] == "2"
    assert sorted(m.step for m in client.get_metric_history(returned["mlflow_run_id"], "val_iou")) == [1, 2]
    assert mlflow_run.data.metrics["val_iou"] == pytest.approx(returned["val_iou"])
    hashes = {(tmp_path / "run" / f"weights-rank{r}.sha256").read_text() for r in range(2)}
    assert len(hashes) == 1

    # The cluster trained from the wheel it installed, and left the runtime's torch and MLflow alone.
    assert str(project_wheel) in jobs_server.installed
    runtime_site = Path(sysconfig.get_paths()["purelib"])  # the runtime's preinstalled packages
    where = subprocess.run(
        [str(cluster_runtime), "-c", "import json, sysconfig, tasks, torch, mlflow; print(json.dumps("
         "[tasks.__file__, torch.__file__, torch.__version__, mlflow.__file__, sysconfig.get_paths()['purelib']]))"],
        capture_output=True, text=True, cwd=tmp_path, env=jobs_server.base_env)
    assert where.returncode == 0, where.stderr[-2000:]
    tasks_file, torch_file, torch_version, mlflow_file, own_site = json.loads(where.stdout)
    assert Path(tasks_file).is_relative_to(own_site)  # the code came from the wheel, not from a checkout
    import torch

    assert Path(torch_file).is_relative_to(runtime_site) and torch_version == torch.__version__  # left alone
    assert Path(mlflow_file).is_relative_to(runtime_site)
    own = {p.name.split("-")[0].lower() for p in Path(own_site).iterdir()}
    assert not own & {"torch", "mlflow", "pyspark", "airflow", "apache_airflow"}, sorted(own)  # no [train], no [airflow]




@pytest.mark.integration
def test_a_failing_entry_point_fails_the_task_with_the_run_state_message(
        airflow_db, jobs_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", jobs_server.connection_uri_json())
    params = {**_defaults(), "databricks_spark_version": "16.4.x-cpu-ml-scala2.12", "databricks_num_workers": 2}
    token = idempotency_token("databricks_submit_failing", "manual__1")
    payload = submit_run_json(params, _config_json(tmp_path, mlflow_run_name="skewed"), token)
    # The cluster's wheel is older than the DAG's code: it does not know a field the DAG sends.
    arguments = payload["tasks"][0]["spark_python_task"]["parameters"]
    arguments[1] = json.dumps({**json.loads(arguments[1]), "dropout": 0.1})

    run, failures = _run_submit_dag("databricks_submit_failing", payload, str(tmp_path / "run"), retries=1)

    # The retry started a run of its own: with the DAG run's token alone Databricks would have answered
    # it with the failed run, and no retry or clear of the task could ever train again.
    tokens = [s.get("idempotency_token") for s in jobs_server.submissions if s["run_name"] == payload["run_name"]]
    assert tokens == [try_token(token, 1), try_token(token, 2)]
    assert len([r for r in jobs_server.runs.values() if r.payload["run_name"] == payload["run_name"]]) == 2

    assert run.state == "failed"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"train": "failed", "read_result": "upstream_failed"}
    fake_run = next(r for r in jobs_server.runs.values() if r.payload["run_name"] == payload["run_name"])
    assert (fake_run.result_state, fake_run.returncode) == ("FAILED", 2)
    assert "unknown TrainConfig field(s): 'dropout'" in fake_run.state_message
    assert len(failures) == 1
    message = str(failures[0])
    assert "failed with terminal state" in message and "'result_state': 'FAILED'" in message
    assert "unknown TrainConfig field(s): 'dropout'" in message
    assert ("GET", "/api/2.2/jobs/runs/get-output") in jobs_server.requests
    assert not (tmp_path / "run" / "result.json").exists()
