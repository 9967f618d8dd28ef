"""bgremoval_retraining: confident and corrected pairs become a new dataset version and a new model.

    (retraining-pool Asset updated by bgremoval_inference, or weekly on Monday 04:00 UTC)
    find_new_pairs ─► enough_new_pairs (at least min_new_pairs, else the run ends here)
      ─► build_dataset (champion's dataset + new pairs, cleaned, de-duplicated, clustered; test split unchanged)
      ─► training_conf ─► trigger_training (bgremoval_training with dataset_version, init_from=champion,
                                            fewer epochs: the same gate decides about promotion)
      ─► record_state (retraining/state.json: which pairs were used)
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from bgremoval_airflow.connections import s3_storage_options
from bgremoval_airflow.params import (
    RETRAINING_POOL_ASSET_NAME,
    batch_params,
    cleaning_params,
    evaluation_params,
    retraining_params,
)

retraining_pool = Asset(name=RETRAINING_POOL_ASSET_NAME, uri="s3://bgremoval/retraining-pool/")


@dag(
    dag_id="bgremoval_retraining",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * 1", timezone="UTC"), assets=[retraining_pool]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "bucket": batch_params()["bucket"],
        "working_size": cleaning_params()["working_size"],
        "registered_model": evaluation_params()["registered_model"],
        **retraining_params(),
    },
    tags=["bgremoval", "training"],
    doc_md=__doc__,
)
def bgremoval_retraining():
    @task
    def find_new_pairs(params=None) -> dict:
        from tasks import registry
        from tasks.feedback.retraining import new_pool_pairs, read_state

        bucket_url, options = f"s3://{params['bucket']}", s3_storage_options()
        state = read_state(bucket_url, options)
        pairs = new_pool_pairs(bucket_url, state, options)
        base = params["base_dataset"].strip()
        if not base:
            version = registry.alias_version(params["registered_model"], registry.CHAMPION)
            if version is not None:
                base = registry.version_tags(params["registered_model"], version).get("dataset_version", "")
        base = base or state.get("last_dataset_version") or ""
        newest = max((p["at"] for p in pairs), default=None)
        print(f"{len(pairs)} new pairs in the retraining pool since {state.get('last_pair_at') or 'the beginning'}; "
              f"base dataset: {base or 'none'}")
        return {"n_new": len(pairs), "until": newest, "base_version": base,
                "origins": {o: sum(p.get("origin") == o for p in pairs) for o in ("published", "accepted", "corrected")}}

    @task.short_circuit
    def enough_new_pairs(found: dict, params=None) -> bool:
        if not found["base_version"]:
            print("no base dataset: the registered model has no champion with a dataset_version tag yet")
            return False
        if found["n_new"] < int(params["min_new_pairs"]):
            print(f"only {found['n_new']} new pairs (< {params['min_new_pairs']}): no retraining this time")
            return False
        return True

    @task
    def build_dataset(found: dict, params=None) -> dict:
        from tasks.feedback.retraining import RetrainingConfig, build_retraining_dataset, format_result, new_pool_pairs, read_state

        bucket_url, options = f"s3://{params['bucket']}", s3_storage_options()
        pairs = [p for p in new_pool_pairs(bucket_url, read_state(bucket_url, options), options)
                 if found["until"] is None or p["at"] <= found["until"]]
        config = RetrainingConfig(min_new_pairs=int(params["min_new_pairs"]), working_size=int(params["working_size"]),
                                  val_fraction=float(params["val_fraction"]))
        result = build_retraining_dataset(bucket_url, found["base_version"], pairs, config, options)
        print(format_result(result))
        return result

    @task
    def training_conf(dataset: dict, params=None) -> dict:
        conf = {**params["training_conf"], "bucket": params["bucket"], "dataset_version": dataset["version"],
                "init_from": "champion", "epochs": int(params["retrain_epochs"]),
                "registered_model": params["registered_model"], "working_size": int(params["working_size"])}
        print(f"triggering bgremoval_training with {conf}")
        return conf

    @task
    def record_state(dataset: dict, params=None, run_id=None, ti=None) -> dict:
        from tasks.feedback.retraining import advance_state, read_state, write_state

        bucket_url, options = f"s3://{params['bucket']}", s3_storage_options()
        triggered = ti.xcom_pull(task_ids="trigger_training", key="trigger_run_id")
        state = advance_state(read_state(bucket_url, options), dataset, retraining_run=run_id, training_run=triggered)
        write_state(bucket_url, state, options)
        print(f"state: pairs up to {state['last_pair_at']} used; dataset {state['last_dataset_version']}; "
              f"training run {triggered}")
        return {"last_pair_at": state["last_pair_at"], "last_dataset_version": state["last_dataset_version"],
                "training_run": triggered}

    found = find_new_pairs()
    dataset = build_dataset(found)
    enough_new_pairs(found) >> dataset
    trigger_training = TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id="bgremoval_training",
        conf=training_conf(dataset),
        wait_for_completion=False,
    )
    trigger_training >> record_state(dataset)


bgremoval_retraining()
