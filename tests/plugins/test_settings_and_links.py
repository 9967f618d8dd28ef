"""The deployment's bucket comes from Airflow's configuration; page links are built, never parsed."""

from __future__ import annotations

from bgremoval_airflow.links import mask_review_page_url, report_page_url, review_page_url
from bgremoval_airflow.settings import configured_bucket, configured_registered_model

from tasks.core import layout


def test_the_bucket_comes_from_the_configuration(monkeypatch):
    monkeypatch.delenv("AIRFLOW__BGREMOVAL__BUCKET", raising=False)
    assert configured_bucket() == layout.DEFAULT_BUCKET
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__BUCKET", "shop-images")
    assert configured_bucket() == "shop-images"


def test_the_registered_model_the_dags_default_to_comes_from_the_configuration(monkeypatch):
    """Runs the scheduler starts by itself (a drop's inference, the pool's retraining) name no model:
    the deployment's setting decides which champion they use."""
    from bgremoval_airflow.params.inference import dag_params

    from tasks.registry import DEFAULT_MODEL_NAME

    monkeypatch.delenv("AIRFLOW__BGREMOVAL__REGISTERED_MODEL", raising=False)
    assert configured_registered_model() == DEFAULT_MODEL_NAME
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__REGISTERED_MODEL", "shop-model")
    assert configured_registered_model() == "shop-model"
    assert dag_params()["registered_model"].value == "shop-model"


def test_page_links_hang_from_the_public_address(monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example/")
    assert review_page_url("v1", "shop") == "https://airflow.example/bgremoval/review/v1?bucket=shop"
    assert mask_review_page_url("v1", "shop") == "https://airflow.example/bgremoval/review/v1/masks?bucket=shop"
    run = layout.run_name("manual__2026-12-02T10:00:00+00:00")
    assert report_page_url("v1", run, "shop") == f"https://airflow.example/bgremoval/reports/v1/{run}?bucket=shop"
