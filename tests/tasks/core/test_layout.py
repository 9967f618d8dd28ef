"""The storage layout: one place builds every shared key, and the DAG-facing helpers agree with it."""

from __future__ import annotations

import pytest

from tasks.core import layout


def test_the_layout_of_a_bucket_reads_like_the_design():
    bucket = layout.bucket_url("shop")
    assert bucket == "s3://shop"
    batch = layout.raw_batch(bucket, "2026-11-27-a")
    assert batch == "s3://shop/raw/2026-11-27-a"
    assert layout.ready_marker(batch) == "s3://shop/raw/2026-11-27-a/_READY"
    assert layout.batch_images(batch) == "s3://shop/raw/2026-11-27-a/images"
    assert layout.batch_masks(batch) == "s3://shop/raw/2026-11-27-a/masks"
    assert layout.batch_truth(batch) == "s3://shop/raw/2026-11-27-a/truth.csv"
    dataset = layout.dataset(bucket, "v1")
    assert layout.manifest(dataset) == "s3://shop/datasets/v1/manifest.parquet"
    assert layout.quarantine(dataset) == "s3://shop/datasets/v1/quarantine.parquet"
    assert layout.manifest(layout.augmented(dataset)) == "s3://shop/datasets/v1/augmented/manifest.parquet"
    assert layout.incoming(bucket, "b") == "s3://shop/incoming/b"
    assert layout.production(bucket, "b") == "s3://shop/production/b"
    assert layout.published(bucket, "drop-1") == "s3://shop/published/drop-1"
    assert layout.corrections_queue(bucket) == "s3://shop/corrections/queue"
    assert layout.corrections_done(bucket) == "s3://shop/corrections/done"
    assert layout.retraining_pool(bucket) == "s3://shop/retraining-pool"
    assert layout.retraining_state(bucket) == "s3://shop/retraining/state.json"


def test_sensor_keys_are_bucket_relative_and_may_be_templates():
    assert layout.ready_key("b") == "raw/b/_READY"
    assert layout.ready_key("{{ params.batch }}", area=layout.INCOMING) == "incoming/{{ params.batch }}/_READY"


def test_a_training_run_folder_holds_the_model_files_and_the_report():
    run = layout.training_run("s3://shop", "v1", "manual__2026-12-02T10:00:00+00:00")
    assert run == "s3://shop/training/v1/manual__2026-12-02T10-00-00-00-00"
    assert layout.model_weights(run).endswith("/model.pt")
    assert layout.model_config(run).endswith("/config.json")
    assert layout.train_result(run).endswith("/result.json")
    assert layout.checkpoint(run).endswith("/checkpoint.pt")
    assert layout.initial_weights(run).endswith("/init")
    assert layout.report_page(run) == f"{run}/report/report.html"


def test_run_names_are_one_safe_segment_and_stable():
    name = layout.run_name("scheduled__2026/12/02 ../x")
    assert "/" not in name and "." not in name
    assert layout.run_name(name) == name
    with pytest.raises(ValueError):
        layout.run_name("///")


def test_asset_uris_follow_the_configured_bucket():
    assert layout.asset_uri("shop", layout.RETRAINING_POOL) == "s3://shop/retraining-pool/"


def test_local_roots_work_the_same_way(tmp_path):
    assert layout.dataset(str(tmp_path), "v") == f"{tmp_path}/datasets/v"


def test_the_model_folder_of_a_run_or_of_a_file_in_it():
    assert layout.model_folder("s3://b/training/v1/run") == "s3://b/training/v1/run"
    assert layout.model_folder("s3://b/training/v1/run/model.pt") == "s3://b/training/v1/run"
    assert layout.model_folder("/runs/r1/MODEL.ONNX") == "/runs/r1"
    assert layout.model_folder("model.pt") == "."  # a bare file name: the working folder
