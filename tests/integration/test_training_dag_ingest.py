"""The training DAG from the S3 sensor to the cleaned dataset, with dag.test() against moto_server."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from tasks.core import storage
from tasks.dev.airflow_client import AirflowHTTPError
from tasks.dev.badinputs import BAD_KINDS, write_bad_inputs
from tasks.core.manifest import read_table

pytestmark = pytest.mark.integration


def _snapshot(url, options):
    return {o.relpath: (o.size, o.etag) for o in storage.list_objects(url, options)}


def _reject_review_when_asked(reviewer) -> threading.Event:
    """The review gate is not under test here: a reviewer rejects, which ends the run after clustering.

    Only reviews of runs that start after this call are answered (another test's run in the same
    metadata database may still wait), and an answer the API refuses, or a request the busy
    api-server does not answer in time, is tried again, until the returned event is set: a lost
    answer (or a polling thread ended by one timeout) would leave ``dag.test`` waiting for input
    forever, as it once did on a loaded machine."""
    stale = {d["task_instance"]["dag_run_id"] for d in reviewer.waiting_human_tasks("bgremoval_training")}
    stop = threading.Event()

    def reject():
        while not stop.is_set():
            with contextlib.suppress(AirflowHTTPError, OSError):  # not ready yet, or a timeout: asked again
                for detail in reviewer.waiting_human_tasks("bgremoval_training"):
                    if detail["task_instance"]["dag_run_id"] not in stale:
                        reviewer.answer(detail, "Reject")
            stop.wait(1.0)

    threading.Thread(target=reject, daemon=True).start()
    return stop


def test_sensor_waits_then_cleaning_runs_mapped_and_reads_back(run_dag, s3_bucket, reviewer):
    bucket_url, options = s3_bucket
    bucket = bucket_url.removeprefix("s3://")
    batch_url = storage.join(bucket_url, "raw", "shoot-1")
    write_bad_inputs(batch_url, len(BAD_KINDS), seed=5, storage_options=options)
    raw_before = _snapshot(storage.join(bucket_url, "raw"), options)

    # The studio finishes its upload a few seconds after the run starts: the sensor must wait.
    ready_at = {}

    def finish_upload():
        time.sleep(4)
        storage.write_bytes(storage.join(batch_url, "_READY"), b"", options)
        ready_at["t"] = time.monotonic()

    uploader = threading.Thread(target=finish_upload)
    started = time.monotonic()
    uploader.start()
    reviewing = _reject_review_when_asked(reviewer)
    try:
        # with the audit's model check (the published weights when on this machine): the wiring runs
        run = run_dag("bgremoval_training",
                      {"batch": "shoot-1", "bucket": bucket, "shard_size": 8, "working_size": 160, "audit_model": "auto"})
    finally:
        reviewing.set()
    uploader.join()

    assert run.state == "success"
    states = {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}
    assert states[("wait_for_batch", -1)] == "success"
    mapped = [k for k in states if k[0] == "clean_shard"]
    assert len(mapped) == 3 and all(states[k] == "success" for k in mapped)
    assert ready_at["t"] - started >= 3.5  # the run really waited for _READY

    summaries = [o for o in storage.list_objects(storage.join(bucket_url, "datasets"), options) if o.relpath.endswith("summary.json")]
    assert len(summaries) == 1
    version = summaries[0].relpath.split("/")[0]
    manifest = read_table(storage.join(bucket_url, "datasets", version, "manifest.parquet"), options)
    quarantine = read_table(storage.join(bucket_url, "datasets", version, "quarantine.parquet"), options)
    assert len(quarantine) == int((manifest["status"] == "quarantined").sum()) >= 15
    assert {"missing_mask", "truncated", "image_too_large", "mask_not_binary", "duplicate"} <= set(quarantine["reason"])
    ok = manifest[manifest["status"] == "ok"]
    assert len(ok) >= 10 and (ok[["width", "height"]].max(axis=1) == 160).all()

    # the reviewer's Reject is recorded with the review: the pages say the run ended there
    from tasks.data.review import load_review_state, review_status

    dataset_url = storage.join(bucket_url, "datasets", version)
    assert review_status(dataset_url, options) == "rejected"
    rejected = load_review_state(dataset_url, options).rejected
    assert rejected["by"] and rejected["by"] != "the review's timeout" and rejected["at"]

    raw_after = _snapshot(storage.join(bucket_url, "raw"), options)
    assert raw_after.pop("shoot-1/_READY")
    assert raw_after == raw_before  # raw/ is never modified

    # Re-running the same batch: same version, nothing duplicated.
    reviewing = _reject_review_when_asked(reviewer)
    try:
        again = run_dag("bgremoval_training", {"batch": "shoot-1", "bucket": bucket, "shard_size": 5, "working_size": 160})
    finally:
        reviewing.set()
    assert again.state == "success"
    versions = {o.relpath.split("/")[0] for o in storage.list_objects(storage.join(bucket_url, "datasets"), options)}
    assert states[("apply_review", -1)] == "skipped" and states[("train_model", -1)] == "skipped"
    assert versions == {version}
    assert len(read_table(storage.join(bucket_url, "datasets", version, "manifest.parquet"), options)) == len(manifest)


def test_a_run_with_a_conf_key_the_dag_does_not_know_fails_at_once(run_dag, s3_bucket, capfd):
    """``epoch`` for ``epochs``: the first task fails without retries, naming the key and the Param
    meant, instead of training with the default number of epochs."""
    bucket = s3_bucket[0].removeprefix("s3://")
    run = run_dag("bgremoval_training", {"batch": "shoot-typo", "bucket": bucket, "epoch": 3})
    assert run.state == "failed"
    first = {ti.task_id: ti for ti in run.get_task_instances()}["choose_start"]
    assert first.state == "failed" and first.try_number == 1
    assert "epoch (did you mean epochs?)" in "".join(capfd.readouterr())
