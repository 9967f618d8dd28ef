"""The evaluation reports in the Airflow UI: ``/bgremoval/reports/{version}/{run}?bucket=B``.

``evaluate_model`` writes ``training/<dataset version>/<run>/report/report.html`` (pictures embedded)
and prints this page's address in its log, so a person reaches the report from the DAG run with the
UI's login. Reading needs read access to ``bgremoval_training``.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import HTMLResponse

from airflow.api_fastapi.core_api.security import requires_access_dag
from bgremoval_airflow.params import DEFAULT_BUCKET
from bgremoval_airflow.web_common import BUCKET_NAME, TRAINING_DAG_ID, current_storage_options

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
can_read = Depends(requires_access_dag("GET", param_dag_id=TRAINING_DAG_ID))


def report_router() -> APIRouter:
    """The routes that serve evaluation reports."""
    router = APIRouter()

    @router.get("/reports/{version}/{run}", response_class=HTMLResponse, dependencies=[can_read])
    def report(version: str, run: str, bucket: str = Query(DEFAULT_BUCKET)) -> HTMLResponse:
        from tasks.core import storage

        if not (_PART.match(version) and _PART.match(run) and BUCKET_NAME.match(bucket)):
            raise HTTPException(422, "malformed dataset version, run or bucket")
        url = f"s3://{bucket}/training/{version}/{run}/report/report.html"
        options = current_storage_options()
        if not storage.exists(url, options):
            raise HTTPException(404, f"no report at {url}")
        return HTMLResponse(storage.read_bytes(url, options).decode("utf-8"))

    return router
