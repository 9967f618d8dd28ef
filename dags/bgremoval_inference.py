"""bgremoval_inference: new product photos in S3 become published cut-outs or correction tasks.

    wait_for_drop (incoming/<batch>/_READY) ─► plan_drop ─► shards
      ─► resolve_model (the champion's version, fixed for the whole run)
      ─► cut_out_shard ×N (champion model, batched; quality score per image;
                           good → published/ + retraining-pool/, doubtful → corrections/queue/)
      ─► report_drop (counts; updates the retraining-pool Asset, which schedules bgremoval_retraining)
    publish_decided (catch-up: photos a person accepted or corrected whose publishing did not happen
                     at the decision; each is cut out with the decided mask into published/<batch>/)

Doubtful images appear on the correction page (menu "Correct masks"), where a person accepts,
rejects or corrects the mask; accepted and corrected photos are then published with that mask, and
their pairs join the retraining pool too.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task
from bgremoval_airflow.assets import retraining_pool
from bgremoval_airflow.connections import s3_storage_options
from bgremoval_airflow.operations import fail_at_once, task_defaults
from bgremoval_airflow.params.inference import dag_params, production_config
from bgremoval_airflow.sensors import ready_marker_sensor
from bgremoval_airflow.settings import max_map_length

from tasks.core import layout


@dag(
    dag_id="bgremoval_inference",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    params=dag_params(),
    default_args=task_defaults(),
    tags=["bgremoval", "production"],
    doc_md=__doc__,
)
def bgremoval_inference():
    wait_for_drop = ready_marker_sensor("wait_for_drop", layout.ready_key("{{ params.batch }}", area=layout.INCOMING))

    @task
    def plan_drop(params=None, run_id=None) -> dict:
        from tasks.feedback.drops import claim_drop
        from tasks.feedback.production import plan_production

        bucket_url = layout.bucket_url(params["bucket"])
        if claim_drop(bucket_url, params["batch"], run_id, s3_storage_options()):
            print(f"drop {params['batch']} marked as handled by {run_id} (bgremoval_drops starts no other run for it)")
        plan = plan_production(bucket_url, params["batch"], int(params["photos_per_shard"]),
                               s3_storage_options(), max_shards=max_map_length())
        print(f"{plan['n_images']} photos in {len(plan['shard_urls'])} shards")
        for problem in plan["problems"]:
            print(f"skipped: {problem}")
        return plan

    @task
    def shards(plan: dict) -> list[str]:
        return plan["shard_urls"]

    @task
    def resolve_model(params=None) -> dict:
        from tasks.feedback.production import NoChampion
        from tasks.feedback.production import resolve_model as resolve

        with fail_at_once(NoChampion):  # no champion appears by waiting minutes
            return resolve(params["model_uri"], params["registered_model"])

    @task(max_active_tis_per_dagrun=4, retries=1)
    def cut_out_shard(shard_url: str, model: dict, params=None, run_id=None) -> dict:
        from tasks.feedback.production import process_shard

        result = process_shard(layout.bucket_url(params["bucket"]), params["batch"], shard_url, model["model_uri"],
                               production_config(params), model_version=model["version"],
                               storage_options=s3_storage_options(), run_id=run_id)
        print(f"published {result['published']}, queued for correction {result['queued']}, failed {result['failed']}, "
              f"handled before {result['earlier']} (threshold {result['threshold']:.3f} from "
              f"{result['threshold_source']}; edge refinement {result['refine']})")
        return result

    @task(outlets=[retraining_pool])
    def report_drop(results: list[dict], params=None, outlet_events=None) -> dict:
        from tasks.feedback.production import summarise_production

        summary = summarise_production(params["batch"], list(results))
        print(f"batch {summary['batch']}: {summary['images']} photos → published {summary['published']}, "
              f"queued for correction {summary['queued']}, failed {summary['failed']}, left as an earlier run "
              f"handled them {summary['earlier']}")
        outlet_events[retraining_pool].extra = {"bucket": params["bucket"], "batch": params["batch"],
                                                "new_pairs": summary["published"]}
        return summary

    @task
    def publish_decided(params=None) -> dict:
        from tasks.feedback.publishing import publish_decisions

        done = publish_decisions(layout.bucket_url(params["bucket"]), s3_storage_options())
        print(f"published {len(done['published'])} decided photos; failed {done['failed'] or 'none'}")
        return done

    publish_decided()
    plan = plan_drop()
    wait_for_drop >> plan
    model = resolve_model()
    results = cut_out_shard.partial(model=model).expand(shard_url=shards(plan))
    report_drop(results)


bgremoval_inference()
