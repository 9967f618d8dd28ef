"""Drop-driven production: ``bgremoval_drops`` (``dag.test()``, moto S3, the Airflow
api-server) starts ``bgremoval_inference`` for each ready drop, exactly once however often it runs."""

from __future__ import annotations

import json
import time

import pytest

from tasks.core import layout, storage

pytestmark = pytest.mark.integration


def _inference_runs(client) -> dict[str, dict]:
    runs = client.request("GET", "/api/v2/dags/bgremoval_inference/dagRuns?limit=100")["dag_runs"]
    return {r["dag_run_id"]: r.get("conf") or {} for r in runs if r["dag_run_id"].startswith("drop__")}


def test_each_ready_drop_starts_one_inference_run(s3_bucket, client_for, run_dag):
    bucket_url, options = s3_bucket
    bucket = bucket_url.removeprefix("s3://")
    admin = client_for("admin")
    for batch in ("studio-a", "studio-b"):
        storage.write_bytes(storage.join(layout.incoming(bucket_url, batch), "p.jpg"), b"jpeg", options)
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "studio-a")), b"", options)

    assert run_dag("bgremoval_drops", {"bucket": bucket}).state == "success"
    runs = _inference_runs(admin)
    assert set(runs) == {"drop__studio-a"}  # studio-b has no _READY yet
    assert runs["drop__studio-a"]["batch"] == "studio-a" and runs["drop__studio-a"]["bucket"] == bucket
    started = json.loads(storage.read_bytes(layout.drop_started(bucket_url, "studio-a"), options))
    assert started["ready"] == runs["drop__studio-a"]["ready"]  # the _READY discovery saw, carried to the marker
    assert storage.exists(layout.drop_started(bucket_url, "studio-a"), options)

    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "studio-b")), b"", options)
    storage.remove(layout.drop_started(bucket_url, "studio-a"), options)  # a lost marker: the run id still guards
    assert run_dag("bgremoval_drops", {"bucket": bucket}).state == "success"
    assert set(_inference_runs(admin)) == {"drop__studio-a", "drop__studio-b"}
    runs = admin.request("GET", "/api/v2/dags/bgremoval_drops/dagRuns?order_by=-start_date&limit=1")["dag_runs"]
    instances = admin.request("GET", f"/api/v2/dags/bgremoval_drops/dagRuns/{runs[0]['dag_run_id']}"
                                     "/taskInstances?limit=100")["task_instances"]
    states = {ti["map_index"]: ti["state"] for ti in instances if ti["task_id"] == "start_inference"}
    assert states == {0: "skipped", 1: "success"}  # studio-a's run existed: not started twice

    time.sleep(1.1)  # S3's LastModified has whole seconds
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "studio-b")), b"", options)  # dropped again
    assert run_dag("bgremoval_drops", {"bucket": bucket}).state == "success"
    again = set(_inference_runs(admin)) - {"drop__studio-a", "drop__studio-b"}
    assert len(again) == 1 and next(iter(again)).startswith("drop__studio-b__")  # one more run, for the new drop
