"""DagBag integrity: every DAG file imports cleanly, cheaply, and follows the project's rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((PROJECT_ROOT / "dags").glob("*.py"))
HEAVY_MODULES = ("torch", "cv2", "sklearn", "mlflow", "tasks.data.cleaning", "tasks.dev.synth", "tasks.model.u2net",
                 "tasks.model.preprocess", "tasks.train.loop")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT_ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert len(dagbag.dags) >= 1


def test_one_dag_per_file_named_after_it(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert Path(dag.fileloc).stem == dag_id, f"{dag_id} lives in {dag.fileloc}"
    assert {Path(f).stem for f in DAG_FILES} == set(dagbag.dags)


def test_dags_are_documented_tagged_and_parameterised(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.doc_md and "bgremoval" in dag.tags, dag_id
        for name, param in dag.params.items():
            assert param.description, f"{dag_id}: param {name} has no description for the form"


#: Run in a fresh interpreter: Airflow's SDK is imported once, then each DAG file is imported in a
#: forked child of its own, which reports the heavy modules it finds loaded.
_PARSE_EACH_DAG_FILE = """
import importlib.util, json, os, sys, traceback
sys.path.insert(0, PLUGINS)
import airflow.sdk
print(json.dumps(["<before any DAG file>", [m for m in HEAVY if m in sys.modules]]), flush=True)
for path in DAG_FILES:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            spec = importlib.util.spec_from_file_location("dagfile", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            os.write(write, json.dumps([m for m in HEAVY if m in sys.modules]).encode())
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(write)
    loaded = b"".join(iter(lambda: os.read(read, 65536), b""))
    _, status = os.waitpid(pid, 0)
    print(json.dumps([os.path.basename(path), json.loads(loaded) if status == 0 else "import failed"]), flush=True)
"""


def test_no_heavy_imports_at_parse_time():
    code = (f"PLUGINS = {str(PROJECT_ROOT / 'plugins')!r}\nHEAVY = {HEAVY_MODULES!r}\n"
            f"DAG_FILES = {[str(f) for f in DAG_FILES]!r}\n" + _PARSE_EACH_DAG_FILE)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = dict(json.loads(line) for line in result.stdout.splitlines() if line.startswith("["))
    assert set(loaded) == {"<before any DAG file>", *(f.name for f in DAG_FILES)}, result.stderr[-2000:]
    for name, modules in loaded.items():
        assert modules == [], f"{name} imports {modules} at parse time; import them inside the task"


def test_training_dag_shape(dagbag):
    dag = dagbag.dags["bgremoval_training"]
    assert dag.get_task("choose_start").downstream_task_ids == {"wait_for_batch", "reuse_dataset"}
    assert dag.get_task("wait_for_batch").downstream_task_ids == {"plan_shards"}
    assert dag.get_task("training_set").upstream_task_ids == {"finalize_dataset", "split_dataset", "reuse_dataset"}
    assert dag.get_task("plan_augmentation").upstream_task_ids == {"training_set"}
    assert "clean_shard" in dag.get_task("shards").downstream_task_ids
    assert dag.get_task("finalize_dataset").upstream_task_ids >= {"clean_shard", "plan_shards"}
    assert dag.params["working_size"] == 320
    evaluate = dag.get_task("evaluate_model")
    assert evaluate.upstream_task_ids >= {"train_model", "databricks_result", "training_set"}
    assert evaluate.trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("check_gate").downstream_task_ids == {"calibrate_quality"}
    assert dag.get_task("calibrate_quality").downstream_task_ids == {"promote_model"}
    assert {"iou_gate", "cluster_iou_gate", "tolerance", "registered_model"} <= set(dag.params.keys())


def test_production_and_retraining_dags_shape(dagbag):
    inference = dagbag.dags["bgremoval_inference"]
    assert inference.get_task("wait_for_drop").downstream_task_ids == {"plan_drop"}
    assert inference.get_task("cut_out_shard").upstream_task_ids == {"shards", "resolve_model"}
    assert [o.name for o in inference.get_task("report_drop").outlets] == ["bgremoval_retraining_pool"]
    retraining = dagbag.dags["bgremoval_retraining"]
    assert "bgremoval_retraining_pool" in repr(retraining.timetable.asset_condition)
    assert retraining.timetable.timetable.expression == "0 4 * * 1"
    assert retraining.get_task("enough_new_pairs").downstream_task_ids == {"build_dataset"}
    trigger = retraining.get_task("trigger_training")
    assert trigger.trigger_dag_id == "bgremoval_training" and trigger.downstream_task_ids == {"record_state"}
    assert trigger.skip_when_already_exists  # with a run id per retraining run: a cleared task starts no 2nd training
    assert set(retraining.params.keys()) >= {"min_new_pairs", "retrain_epochs", "registered_model"}


def test_every_task_has_a_time_limit_retries_and_a_failure_notice(dagbag):
    from bgremoval_airflow.operations import TASK_TIMEOUT, TRAINING_TIMEOUT, FailureLog, refuse_unknown_conf

    for dag_id, dag in dagbag.dags.items():
        for task in dag.tasks:
            where = f"{dag_id}.{task.task_id}"
            assert any(isinstance(n, FailureLog) for n in task.on_failure_callback or []), where
            hook = task.partial_kwargs.get("pre_execute") if hasattr(task, "partial_kwargs") else task._pre_execute_hook
            assert hook is refuse_unknown_conf, where  # a typo in a run's conf fails the run at once
            if task.task_id == "review_clusters":  # waits for people; their decision is not retried
                assert task.execution_timeout is None and task.retries == 0, where
                continue
            assert task.execution_timeout in (TASK_TIMEOUT, TRAINING_TIMEOUT), where
            assert task.retries >= 1 and task.retry_exponential_backoff, where
    training = dagbag.dags["bgremoval_training"]
    for task_id in ("train_model", "train_on_databricks"):
        assert training.get_task(task_id).execution_timeout == TRAINING_TIMEOUT
    review = training.get_task("review_clusters")
    assert review.response_timeout.total_seconds() == 72 * 3600 and review.defaults == ["Reject"]
    assert [type(n).__name__ for n in review.notifiers] == ["ReviewRequested"]


def test_drops_start_inference_once_per_batch(dagbag):
    drops = dagbag.dags["bgremoval_drops"]
    assert drops.max_active_runs == 1 and not drops.catchup
    assert drops.get_task("find_new_drops").downstream_task_ids == {"start_inference", "mark_started"}
    start = drops.get_task("start_inference")
    assert start.partial_kwargs["trigger_dag_id"] == "bgremoval_inference"
    assert start.partial_kwargs["skip_when_already_exists"] is True
    assert start.downstream_task_ids == {"mark_started"}


def test_every_pool_a_task_uses_is_shipped_and_promotions_run_one_at_a_time(dagbag):
    from bgremoval_airflow.settings import POOLS_FILE, PROMOTION_POOL

    pools = json.loads(POOLS_FILE.read_text())
    used = {task.pool for dag in dagbag.dags.values() for task in dag.tasks} - {"default_pool"}
    assert used <= set(pools), used - set(pools)
    assert dagbag.dags["bgremoval_training"].get_task("promote_model").pool == PROMOTION_POOL
    assert pools[PROMOTION_POOL]["slots"] == 1


def test_sensors_defer_by_their_own_argument_not_a_global_setting(dagbag):
    for dag_id, task_id in (("bgremoval_training", "wait_for_batch"), ("bgremoval_inference", "wait_for_drop")):
        sensor = dagbag.dags[dag_id].get_task(task_id)
        passed = sensor._BaseOperator__init_kwargs  # what the DAG file gave, before any configured default
        assert passed.get("deferrable") is True and "mode" not in passed, f"{dag_id}.{task_id}: {passed}"


def test_the_training_dag_raises_a_deadline_alert_when_configured_and_it_survives_serialisation(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    from bgremoval_airflow.operations import run_overdue

    monkeypatch.delenv("AIRFLOW__BGREMOVAL__TRAINING_DEADLINE_HOURS", raising=False)
    assert not DagBag(dag_folder=str(PROJECT_ROOT / "dags" / "bgremoval_training.py")).dags["bgremoval_training"].deadline
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__TRAINING_DEADLINE_HOURS", "108")
    training = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / "bgremoval_training.py")).dags["bgremoval_training"]
    (alert,) = training.deadline
    assert type(alert.reference).__name__ == "DagRunQueuedAtDeadline"
    assert alert.interval.total_seconds() == 108 * 3600
    assert alert.callback.path == f"{run_overdue.__module__}.run_overdue"
    serialised = json.dumps(DagSerialization.to_dict(training))
    assert "run_overdue" in serialised and "DagRunQueuedAtDeadline" in serialised


def test_every_param_is_bounded_numbers_by_range_text_by_pattern(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    unbounded = []
    for dag_id, dag in sorted(dagbag.dags.items()):
        for name in dag.params:
            schema = dag.params.get_param(name).schema
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            numeric = {"integer", "number"} & set(types)
            if numeric and not ({"minimum", "exclusiveMinimum"} & set(schema) and "maximum" in schema):
                unbounded.append(f"{dag_id}.{name}: no range")
            if "string" in types and not ({"pattern", "enum"} & set(schema)):
                unbounded.append(f"{dag_id}.{name}: no pattern")
    assert unbounded == []

    params = dagbag.dags["bgremoval_training"].params
    for name, value in (("bucket", "my-studio.images"), ("init_from", "models:/bgremoval-u2net@champion"),
                        ("init_from", "s3://b/training/v1/run/model.pt"), ("init_from", "scratch"),
                        ("audit_model", "/models/u2netp.onnx"), ("registered_model", "bgremoval-u2net")):
        params.get_param(name).resolve(value)
    for name, value in (("bucket", "Someone_Else"), ("init_from", "models:/x; rm -rf /"), ("init_from", "../model.pt"),
                        ("registered_model", "a b"), ("max_megapixels", 500), ("shard_size", 10**7)):
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(value)
