"""bgremoval_training: a studio batch in S3 becomes a cleaned, versioned training dataset.

    wait_for_batch ──► plan_shards ──► shards ──► clean_shard (mapped, one per shard) ──► finalize_dataset

Trigger it from the UI with the parameter form (batch name, bucket, working resolution, ...).
"""

from __future__ import annotations

import pendulum
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.sdk import dag, task
from bgremoval_airflow.connections import AWS_CONN_ID, s3_storage_options
from bgremoval_airflow.params import batch_params, cleaning_config, cleaning_params


@dag(
    dag_id="bgremoval_training",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    params={**batch_params(), **cleaning_params()},
    tags=["bgremoval", "training"],
    doc_md=__doc__,
)
def bgremoval_training():
    wait_for_batch = S3KeySensor(
        task_id="wait_for_batch",
        aws_conn_id=AWS_CONN_ID,
        bucket_name="{{ params.bucket }}",
        bucket_key="raw/{{ params.batch }}/_READY",
        poke_interval=10,
        timeout=6 * 60 * 60,
        mode="reschedule",
    )

    @task
    def plan_shards(params=None) -> dict:
        from tasks.ingest import plan_batch

        return plan_batch(
            bucket_url=f"s3://{params['bucket']}",
            batch=params["batch"],
            config=cleaning_config(params),
            shard_size=int(params["shard_size"]),
            storage_options=s3_storage_options(),
        )

    @task
    def shards(plan: dict) -> list[str]:
        return plan["shard_urls"]

    @task(max_active_tis_per_dagrun=4)
    def clean_shard(shard_url: str, plan: dict, params=None) -> dict:
        from tasks.ingest import clean_shard as clean

        return clean(
            shard_url=shard_url,
            dataset_url=plan["dataset_url"],
            batch=plan["batch"],
            config=cleaning_config(params),
            storage_options=s3_storage_options(),
        )

    @task(trigger_rule="none_failed")
    def finalize_dataset(plan: dict, shard_results: list[dict]) -> dict:
        from tasks.ingest import finalize_dataset as finalize
        from tasks.ingest import format_summary

        summary = finalize(
            dataset_url=plan["dataset_url"],
            batch=plan["batch"],
            result_urls=[r["result_url"] for r in shard_results],
            listing_rejects_url=plan["listing_rejects_url"],
            storage_options=s3_storage_options(),
        )
        print(format_summary(summary))
        return summary

    plan = plan_shards()
    cleaned = clean_shard.partial(plan=plan).expand(shard_url=shards(plan))
    wait_for_batch >> plan
    finalize_dataset(plan=plan, shard_results=cleaned)


bgremoval_training()
