"""bgremoval_drops: every studio drop marked ready starts bgremoval_inference, once.

    find_new_drops (incoming/<batch>/_READY without production/<batch>/_STARTED, or written anew since
                    it was marked; every 5 minutes)
      ─► start_inference ×N (bgremoval_inference, run id drop__<batch>, drop__<batch>__<ready> for a
                             later drop: Airflow creates each once; a run that exists is skipped)
      ─► mark_started (production/<batch>/_STARTED with the _READY it was for, as find_new_drops saw it)

A scheduled discovery rather than Airflow 3's event-driven scheduling: an AssetWatcher needs a
message queue trigger (SQS and the like) fed by bucket notifications, which MinIO and moto setups
do not have by default, whereas a five-minute poll costs one delimited listing of incoming/ and a
HEAD per new batch on any S3 store. The run id makes the trigger idempotent, so a poll that runs
twice, or a marker that was lost, never starts a batch twice.
"""

from __future__ import annotations

import datetime

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task
from bgremoval_airflow.connections import s3_storage_options
from bgremoval_airflow.operations import task_defaults
from bgremoval_airflow.params.common import bucket_param

from tasks.core import layout


@dag(
    dag_id="bgremoval_drops",
    schedule=datetime.timedelta(minutes=5),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={"bucket": bucket_param()},
    default_args=task_defaults(),
    tags=["bgremoval", "production"],
    doc_md=__doc__,
)
def bgremoval_drops():
    @task
    def find_new_drops(params=None) -> list[dict]:
        from tasks.feedback.drops import new_drops

        drops = new_drops(layout.bucket_url(params["bucket"]), s3_storage_options())
        print(f"new drops: {[d['run_id'] for d in drops] or 'none'}")
        return [{"trigger_run_id": d["run_id"],
                 "conf": {"batch": d["batch"], "bucket": params["bucket"], "ready": d["ready"]}} for d in drops]

    @task(trigger_rule="none_failed")
    def mark_started(drops: list[dict], params=None) -> list[str]:
        from tasks.feedback.drops import mark_started as mark

        return [mark(layout.bucket_url(params["bucket"]), d["conf"]["batch"], d["trigger_run_id"], d["conf"]["ready"],
                     s3_storage_options()) for d in drops]

    drops = find_new_drops()
    start_inference = TriggerDagRunOperator.partial(
        task_id="start_inference",
        trigger_dag_id="bgremoval_inference",
        skip_when_already_exists=True,
        wait_for_completion=False,
    ).expand_kwargs(drops)
    start_inference >> mark_started(drops)


bgremoval_drops()
