"""bgremoval_training: a studio batch in S3 becomes a reviewed, split and augmented training set.

    choose_start ─┬► wait_for_batch ─► plan_shards ─► clean_shard ×N ─► finalize_dataset
      ─► feature_shards ─► extract_features ×N ─► cluster_products
      ─► review_clusters (human in the loop: Approve / Reject)
      ─► apply_review ─► split_dataset ─► training_set
                  └► reuse_dataset (retraining: an existing version, its splits kept) ─► training_set
      ─► plan_augmentation ─► augment_cluster ×clusters ─► finalize_augmentation
      ─► choose_compute ─┬► train_model (local torch.distributed workers; resumes on retry)
                         └► databricks_run ─► train_on_databricks (GPU job cluster, TorchDistributor)
                                           ─► databricks_result (MLflow run id back to Airflow)
      ─► evaluate_model (challenger and champion on the same test split; HTML report to S3 and MLflow)
      ─► check_gate (mean IoU, every cluster, not worse than the champion; a failure fails the run, or
                     with gate_failure=skip only skips promotion)
      ─► calibrate_quality (the production quality threshold and whether cut-outs are edge-refined, on the
                            val split; both measured on test)
      ─► promote_model (registers PyTorch + ONNX; alias champion, the former one becomes previous)

Trigger it from the UI with the parameter form (batch name, bucket, working resolution, clusters,
split shares, augmentation target). The run stops at ``review_clusters`` until a reviewer has
corrected the clusters on the review page and chosen Approve or Reject in Required Actions; Reject
ends the run without training. The evaluation report's address is printed in the log of
``evaluate_model``; a challenger that fails the gate fails ``check_gate`` with its reasons (the run
ends failed, so the failure notices fire; ``gate_failure=skip`` skips promotion in a successful run).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task
from bgremoval_airflow.connections import s3_storage_options
from bgremoval_airflow.databricks import DATABRICKS_CONN_ID, databricks_params, idempotency_token, submit_run_json
from bgremoval_airflow.links import mask_review_page_url, report_page_url, review_page_url
from bgremoval_airflow.operations import (
    TRAINING_TIMEOUT,
    fail_at_once,
    gate_passed,
    review_gate,
    task_defaults,
    training_deadline,
)
from bgremoval_airflow.operators import ClusterReviewGate, TrainOnDatabricks
from bgremoval_airflow.sensors import ready_marker_sensor
from bgremoval_airflow.settings import PROMOTION_POOL, max_map_length
from bgremoval_airflow.params.training import (
    assessment_config,
    augment_config,
    cleaning_config,
    clustering_config,
    dag_params,
    split_config,
    train_config,
)

from tasks.core import layout


@dag(
    dag_id="bgremoval_training",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    params={**dag_params(), **databricks_params()},
    default_args=task_defaults(),
    deadline=training_deadline("bgremoval_training"),
    tags=["bgremoval", "training"],
    doc_md=__doc__,
)
def bgremoval_training():
    @task.branch
    def choose_start(params=None) -> str:
        if params["dataset_version"].strip():
            return "reuse_dataset"
        with fail_at_once(ValueError):  # splits that leave no training pairs: here, not after the review
            split_config(params)
        return "wait_for_batch"

    @task
    def reuse_dataset(params=None) -> dict:
        from tasks.data.ingest import existing_dataset

        return existing_dataset(layout.bucket_url(params["bucket"]), params["dataset_version"], s3_storage_options())

    @task(trigger_rule="none_failed_min_one_success")
    def training_set(fresh: dict | None, splits: dict | None, reused: dict | None) -> dict:
        return reused or fresh

    wait_for_batch = ready_marker_sensor("wait_for_batch", layout.ready_key("{{ params.batch }}"))

    @task
    def plan_shards(params=None) -> dict:
        from tasks.data.ingest import plan_batch

        return plan_batch(
            bucket_url=layout.bucket_url(params["bucket"]),
            batch=params["batch"],
            config=cleaning_config(params),
            shard_size=int(params["shard_size"]),
            storage_options=s3_storage_options(),
            max_shards=max_map_length(),
        )

    @task
    def shards(plan: dict) -> list[str]:
        return plan["shard_urls"]

    @task(max_active_tis_per_dagrun=4)
    def clean_shard(shard_url: str, plan: dict, params=None) -> dict:
        from tasks.data.ingest import clean_shard as clean
        from tasks.serving.engines import audit_predictor

        predict, why = audit_predictor(params["audit_model"], params["registered_model"], s3_storage_options())
        print(f"mask audit, model check: {why}")
        return clean(
            shard_url=shard_url,
            dataset_url=plan["dataset_url"],
            batch=plan["batch"],
            config=cleaning_config(params),
            storage_options=s3_storage_options(),
            predict=predict,
        )

    @task(trigger_rule="none_failed_min_one_success")
    def finalize_dataset(plan: dict, shard_results: list[dict]) -> dict:
        from tasks.data.ingest import finalize_dataset as finalize
        from tasks.data.ingest import format_summary

        summary = finalize(
            dataset_url=plan["dataset_url"],
            batch=plan["batch"],
            result_urls=[r["result_url"] for r in shard_results],
            listing_rejects_url=plan["listing_rejects_url"],
            storage_options=s3_storage_options(),
        )
        print(format_summary(summary))
        return summary

    @task
    def feature_shards(dataset: dict, params=None) -> list[dict]:
        from tasks.data.features import plan_feature_shards

        return plan_feature_shards(dataset["dataset_url"], int(params["shard_size"]), s3_storage_options(),
                                   max_shards=max_map_length())

    @task(max_active_tis_per_dagrun=4)
    def extract_features(dataset_url: str, shard: int, start: int, stop: int) -> dict:
        from tasks.data.features import extract_shard_features

        return extract_shard_features(dataset_url, shard, start, stop, s3_storage_options())

    @task
    def cluster_products(dataset: dict, features: list[dict], params=None) -> dict:
        from tasks.data.clustering import ReviewLinks, propose_clusters

        bucket, version = params["bucket"], dataset["version"]
        summary = propose_clusters(
            dataset,
            [f["features_url"] for f in features],
            clustering_config(params),
            batch=params["batch"],
            links=ReviewLinks(review_page_url(version, bucket), mask_review_page_url(version, bucket)),
            truth_url=layout.batch_truth(layout.raw_batch(layout.bucket_url(bucket), params["batch"])),
            storage_options=s3_storage_options(),
        )
        print(summary["table"])
        return summary

    review_clusters = ClusterReviewGate(
        task_id="review_clusters",
        subject="Review the product clusters of batch {{ params.batch }}",
        body="{{ ti.xcom_pull(task_ids='cluster_products')['review_markdown'] }}",
        dataset_url="{{ ti.xcom_pull(task_ids='finalize_dataset')['dataset_url'] }}",
        ignore_downstream_trigger_rules=True,
        **review_gate(),
    )

    @task
    def apply_review(dataset: dict) -> dict:
        from tasks.data.review import apply_review as apply

        return apply(dataset["dataset_url"], s3_storage_options())

    @task
    def split_dataset(dataset: dict, reviewed: dict, params=None) -> dict:
        from tasks.data.splits import split_dataset as split

        previous = params["previous_dataset"].strip()
        previous_url = layout.manifest(layout.dataset(layout.bucket_url(params["bucket"]), previous)) if previous else None
        return split(dataset["dataset_url"], split_config(params), previous_url, s3_storage_options())

    @task
    def plan_augmentation(dataset: dict, params=None) -> list[dict]:
        from tasks.data.augment import plan_augmentation as plan
        from tasks.core.manifest import read_table

        options = s3_storage_options()
        manifest = read_table(layout.manifest(dataset["dataset_url"]), options)
        todo = plan(manifest, augment_config(params))
        return [{"cluster": cluster, "n": n} for cluster, n in sorted(todo.items())]

    @task(max_active_tis_per_dagrun=4)
    def augment_cluster(cluster: str, n: int, dataset: dict, params=None) -> dict:
        from tasks.data.augment import augment_cluster as augment

        config = augment_config(params)
        return augment(dataset["dataset_url"], cluster, n, config, s3_storage_options())

    @task(trigger_rule="none_failed")
    def finalize_augmentation(dataset: dict, parts: list[dict]) -> dict:
        from tasks.data.augment import finalize_augmentation as finalize

        return finalize(dataset["dataset_url"], [p["part_url"] for p in parts], s3_storage_options())

    def _output_url(params: dict, dataset: dict, run_id: str) -> str:
        return layout.training_run(layout.bucket_url(params["bucket"]), dataset["version"], run_id)

    @task.branch
    def choose_compute(augmented: dict, params=None) -> str:
        return "train_model" if params["compute"] == "local" else "databricks_run"

    def _start_weights(params: dict, output_url: str, options: dict) -> str | None:
        from tasks.registry import start_weights

        reference, staged = start_weights(params["init_from"], params["model"], params["registered_model"],
                                          output_url, options)
        print(f"initial weights: {reference or 'random'} (init_from={params['init_from']!r})")
        return staged

    @task(retries=2, execution_timeout=TRAINING_TIMEOUT)
    def train_model(dataset: dict, params=None, run_id=None) -> dict:
        from tasks.model.io import train_result_lines
        from tasks.train.ddp import launch_local

        options, output_url = s3_storage_options(), _output_url(params, dataset, run_id)
        config = train_config(params, dataset["dataset_url"], output_url, options,
                              init_from=_start_weights(params, output_url, options))
        result = launch_local(config, nproc=int(params["workers"])).to_dict()
        print("\n".join(train_result_lines(result)))
        return {k: v for k, v in result.items() if k not in ("history", "config")}

    @task
    def databricks_run(dataset: dict, params=None, run_id=None, dag=None) -> dict:
        from dataclasses import replace

        # The cluster reaches S3 through its instance profile (no credentials in the run's parameters)
        # and MLflow through the cluster's MLFLOW_TRACKING_URI, not the Airflow worker's.
        output_url = _output_url(params, dataset, run_id)
        config = train_config(params, dataset["dataset_url"], output_url, {},
                              init_from=_start_weights(params, output_url, s3_storage_options()))
        return submit_run_json(params, replace(config, mlflow_tracking_uri=None).to_json(),
                               idempotency_token(dag.dag_id, run_id, output_url))  # train_on_databricks adds its try

    @task
    def databricks_result(dataset: dict, params=None, run_id=None) -> dict:
        from bgremoval_airflow.databricks import mlflow_run_id_from_result, read_train_result
        from tasks.model.io import train_result_lines

        result = read_train_result(_output_url(params, dataset, run_id), s3_storage_options())
        mlflow_run_id_from_result(result)  # a run that logged nothing to MLflow cannot be evaluated and registered
        print("on Databricks: " + "\n".join(train_result_lines(result)))
        return {k: v for k, v in result.items() if k not in ("history", "config")}

    @task(trigger_rule="none_failed_min_one_success")
    def evaluate_model(dataset: dict, local: dict | None, remote: dict | None, params=None, run_id=None) -> dict:
        from tasks.evaluation.assessment import assess_challenger

        trained = local or remote
        output_url = _output_url(params, dataset, run_id)
        assessment = assess_challenger(
            model_url=output_url,
            dataset_url=dataset["dataset_url"],
            report_url=layout.report(output_url),
            config=assessment_config(params),
            storage_options=s3_storage_options(),
            mlflow_run_id=trained.get("mlflow_run_id"),
            facts={"dataset version": dataset["version"], "Airflow run": run_id},
        )
        print(assessment["table"])
        print(assessment["verdict"])
        print(f"report: {assessment['report_html']} (also under report/ in MLflow run {assessment['mlflow_run_id']})")
        print(f"report in the Airflow UI: {report_page_url(dataset['version'], layout.run_name(run_id), params['bucket'])}")
        return assessment

    @task.short_circuit
    def check_gate(assessment: dict, params=None) -> bool:
        return gate_passed(assessment["gate"], params["gate_failure"])

    @task
    def calibrate_quality(dataset: dict, assessment: dict, params=None) -> dict:
        from tasks.evaluation.assessment import calibrate_challenger

        calibration = calibrate_challenger(assessment, dataset["dataset_url"], float(params["routing_target_iou"]),
                                           s3_storage_options())
        print(calibration["text"])
        return {k: v for k, v in calibration.items() if k != "text"}

    @task(pool=PROMOTION_POOL)
    def promote_model(dataset: dict, assessment: dict, params=None, run_id=None) -> dict:
        from tasks.evaluation.assessment import PromotionRefused, register_and_promote

        with fail_at_once(PromotionRefused):  # a version rolled back since: promoting it stays a person's call
            promoted = register_and_promote(assessment, dataset["version"], assessment_config(params),
                                            s3_storage_options(), user=f"airflow:{run_id}")
        print(f"{promoted['name']} version {promoted['version']} is the champion; previous: {promoted['previous']}"
              + (" (registered by an earlier try of this task)" if promoted["registered_before"] else ""))
        return promoted

    start = choose_start()
    reused = reuse_dataset()
    start >> [wait_for_batch, reused]
    plan = plan_shards()
    wait_for_batch >> plan
    cleaned = clean_shard.partial(plan=plan).expand(shard_url=shards(plan))
    dataset = finalize_dataset(plan=plan, shard_results=cleaned)

    features = extract_features.expand_kwargs(feature_shards(dataset))
    clusters = cluster_products(dataset, features)
    clusters >> review_clusters
    reviewed = apply_review(dataset)
    review_clusters >> reviewed
    splits = split_dataset(dataset, reviewed)
    training = training_set(dataset, splits, reused)
    parts = augment_cluster.partial(dataset=training).expand_kwargs(plan_augmentation(training))
    augmented = finalize_augmentation(training, parts)
    compute = choose_compute(augmented)
    trained_locally = train_model(training)
    compute >> trained_locally
    payload = databricks_run(training)
    # While it waits in the triggerer, Airflow 3.3 does not apply execution_timeout (apache/airflow#69679):
    # the run's own timeout_seconds (the form's databricks_timeout_minutes) is what stops it.
    train_on_databricks = TrainOnDatabricks(
        task_id="train_on_databricks", json=payload, databricks_conn_id=DATABRICKS_CONN_ID, deferrable=True,
        execution_timeout=TRAINING_TIMEOUT,
    )
    trained_remotely = databricks_result(training)
    compute >> payload >> train_on_databricks >> trained_remotely

    assessment = evaluate_model(training, trained_locally, trained_remotely)
    check_gate(assessment) >> calibrate_quality(training, assessment) >> promote_model(training, assessment)


bgremoval_training()
