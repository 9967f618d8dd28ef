"""bgremoval_inference: new product photos in S3 become published cut-outs or correction tasks.

    wait_for_drop (incoming/<batch>/_READY) ─► plan_drop ─► shards
      ─► resolve_model (the champion's version, fixed for the whole run)
      ─► cut_out_shard ×N (champion model, batched; quality score per image;
                           good → published/ + retraining-pool/, doubtful → corrections/queue/)
      ─► report_drop (counts; updates the retraining-pool Asset, which schedules bgremoval_retraining)

Doubtful images appear on the correction page (menu "Correct masks"), where a person accepts,
rejects or corrects the mask; accepted and corrected pairs join the retraining pool too.
"""

from __future__ import annotations

import pendulum
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.sdk import Asset, dag, task
from bgremoval_airflow.connections import AWS_CONN_ID, s3_storage_options
from bgremoval_airflow.params import (
    RETRAINING_POOL_ASSET_NAME,
    batch_params,
    evaluation_params,
    production_config,
    production_params,
)

retraining_pool = Asset(name=RETRAINING_POOL_ASSET_NAME, uri="s3://bgremoval/retraining-pool/")


@dag(
    dag_id="bgremoval_inference",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    params={
        **batch_params(folder="incoming"),
        **production_params(),
        "registered_model": evaluation_params()["registered_model"],
    },
    tags=["bgremoval", "production"],
    doc_md=__doc__,
)
def bgremoval_inference():
    wait_for_drop = S3KeySensor(
        task_id="wait_for_drop",
        aws_conn_id=AWS_CONN_ID,
        bucket_name="{{ params.bucket }}",
        bucket_key="incoming/{{ params.batch }}/_READY",
        poke_interval=10,
        timeout=6 * 60 * 60,
        mode="reschedule",
    )

    @task
    def plan_drop(params=None) -> dict:
        from tasks.feedback.production import plan_production

        plan = plan_production(f"s3://{params['bucket']}", params["batch"], int(params["shard_size"]),
                               s3_storage_options())
        print(f"{plan['n_images']} photos in {len(plan['shard_urls'])} shards")
        for problem in plan["problems"]:
            print(f"skipped: {problem}")
        return plan

    @task
    def shards(plan: dict) -> list[str]:
        return plan["shard_urls"]

    @task
    def resolve_model(params=None) -> dict:
        from tasks import registry

        chosen = params["model_uri"].strip()
        if chosen:
            return {"model_uri": chosen, "version": chosen}
        version = registry.alias_version(params["registered_model"], registry.CHAMPION)
        if version is None:
            raise ValueError(f"registered model {params['registered_model']!r} has no champion yet: "
                             "run bgremoval_training first, or set the model parameter")
        print(f"champion: {params['registered_model']} version {version}")
        return {"model_uri": registry.model_uri(params["registered_model"], version=version), "version": version}

    @task(max_active_tis_per_dagrun=4, retries=1)
    def cut_out_shard(shard_url: str, model: dict, params=None) -> dict:
        from tasks.feedback.production import process_shard

        result = process_shard(f"s3://{params['bucket']}", params["batch"], shard_url, model["model_uri"],
                               production_config(params), model_version=model["version"],
                               storage_options=s3_storage_options())
        print(f"published {result['published']}, queued for correction {result['queued']}, failed {result['failed']} "
              f"(threshold {result['threshold']:.3f} from {result['threshold_source']})")
        return result

    @task(outlets=[retraining_pool])
    def report_drop(results: list[dict], params=None, outlet_events=None) -> dict:
        from tasks.feedback.production import summarise_production

        summary = summarise_production(params["batch"], list(results))
        print(f"batch {summary['batch']}: {summary['images']} photos → published {summary['published']}, "
              f"queued for correction {summary['queued']}, failed {summary['failed']}")
        outlet_events[retraining_pool].extra = {"bucket": params["bucket"], "batch": params["batch"],
                                                "new_pairs": summary["published"]}
        return summary

    plan = plan_drop()
    wait_for_drop >> plan
    model = resolve_model()
    results = cut_out_shard.partial(model=model).expand(shard_url=shards(plan))
    report_drop(results)


bgremoval_inference()
