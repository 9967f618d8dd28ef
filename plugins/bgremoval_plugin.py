"""Registers the bgremoval web app (:mod:`bgremoval_airflow.web`) with the Airflow api-server, and menu links to it."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


def _web_app():
    from bgremoval_airflow.web.app import create_app

    return create_app()


class BgremovalPlugin(AirflowPlugin):
    """Serves the review pages at ``/bgremoval`` (same login as the Airflow UI): two menu entries,
    and an "Evaluation report" tab on every DAG run page (a training run's report; other DAGs' runs
    say they have none)."""

    name = "bgremoval"
    fastapi_apps = [{"app": _web_app(), "url_prefix": "/bgremoval", "name": "bgremoval review"}]
    external_views = [
        {"name": "Review clusters", "href": "/bgremoval/", "destination": "nav", "url_route": "bgremoval"},
        {"name": "Correct masks", "href": "/bgremoval/corrections", "destination": "nav", "url_route": "bgremoval-corrections"},
        {"name": "Evaluation report", "href": "/bgremoval/reports/runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "bgremoval-report"},
    ]
