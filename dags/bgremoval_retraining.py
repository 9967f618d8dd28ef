"""bgremoval_retraining: confident and corrected pairs become a new dataset version and a new model.

    (retraining-pool Asset updated by bgremoval_inference, or weekly on Monday 04:00 UTC)
    find_new_pairs ─► enough_new_pairs (at least min_new_pairs, else the run ends here)
      ─► build_dataset (champion's dataset + new pairs + earlier runs' pairs it lacks, cleaned, de-duplicated,
                       clustered; test split unchanged)
      ─► training_conf ─► trigger_training (bgremoval_training with dataset_version, init_from=champion,
                                            the champion's model, input size and loss unless training_conf
                                            sets them, fewer epochs: the same gate decides about promotion; run id
                                            retrain__<dataset version>__<this run's id>: cleared or retried,
                                            it starts no second run on the same version)
      ─► record_state (retraining/state.json: which pairs were used)
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from bgremoval_airflow.assets import retraining_pool
from bgremoval_airflow.connections import s3_storage_options
from bgremoval_airflow.operations import fail_at_once, task_defaults
from bgremoval_airflow.params.retraining import dag_params, retraining_config


@dag(
    dag_id="bgremoval_retraining",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * 1", timezone="UTC"), assets=[retraining_pool]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=dag_params(),
    default_args=task_defaults(),
    tags=["bgremoval", "training"],
    doc_md=__doc__,
)
def bgremoval_retraining():
    @task
    def find_new_pairs(params=None) -> dict:
        from tasks.core import layout
        from tasks.feedback.retraining_stages import find_new_pairs as find

        return find(layout.bucket_url(params["bucket"]), params["base_dataset"], params["registered_model"],
                    s3_storage_options())

    @task.short_circuit
    def enough_new_pairs(found: dict, params=None) -> bool:
        from tasks.feedback.retraining_stages import worth_retraining

        return worth_retraining(found, int(params["min_new_pairs"]))

    @task
    def build_dataset(found: dict, params=None) -> dict:
        from tasks.core import layout
        from tasks.feedback.retraining_stages import build_dataset as build

        return build(layout.bucket_url(params["bucket"]), found, retraining_config(params), s3_storage_options())

    @task(multiple_outputs=True)
    def training_conf(dataset: dict, params=None, run_id=None) -> dict:
        from tasks.feedback.retraining_stages import training_request
        from tasks.registry import training_recipe

        with fail_at_once(ValueError):  # a champion the training form cannot retrain: waiting does not change it
            return training_request(params["training_conf"], params["bucket"], dataset["version"],
                                    int(params["retrain_epochs"]), params["registered_model"],
                                    int(params["working_size"]), run_id, training_recipe(params["registered_model"]))

    @task(trigger_rule="none_failed")  # also after a cleared trigger_training found its run (skipped)
    def record_state(dataset: dict, training_run: str, params=None, run_id=None) -> dict:
        from tasks.core import layout
        from tasks.feedback.retraining_stages import record_state as record

        return record(layout.bucket_url(params["bucket"]), dataset, run_id, training_run, s3_storage_options())

    found = find_new_pairs()
    dataset = build_dataset(found)
    enough_new_pairs(found) >> dataset
    request = training_conf(dataset)
    trigger_training = TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id="bgremoval_training",
        trigger_run_id=request["run_id"],
        conf=request["conf"],
        skip_when_already_exists=True,
        wait_for_completion=False,
    )
    trigger_training >> record_state(dataset, request["run_id"])


bgremoval_retraining()
