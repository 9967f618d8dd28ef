"""The evaluation reports in the Airflow UI.

``evaluate_model`` writes ``training/<dataset version>/<run>/report/report.html`` (pictures embedded,
see :func:`tasks.core.layout.report_page`) and prints this page's address in its log
(:func:`bgremoval_airflow.links.report_page_url`), so a person reaches the report from the DAG run
with the UI's login. Reading needs read access to ``bgremoval_training``. The page is the stored
report itself: no template. It is served sandboxed (``Content-Security-Policy: sandbox``, its
pictures are embedded), so a report cannot run script on the Airflow origin, and only from the
buckets this deployment serves.

Routes (all below ``/bgremoval``):

* ``GET  /reports/{version}/{run}?bucket=B``   the report of one training run (``run`` as
  :func:`tasks.core.layout.run_name` makes it)
* ``GET  /reports/runs/{dag_id}/{run_id}``     the report of an Airflow run of ``bgremoval_training``,
  found in the bucket the run was given: a redirect to the page above. The plugin shows it as the
  "Evaluation report" tab of a DAG run in the Airflow UI (an external view, ``destination="dag_run"``).
"""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse

from bgremoval_airflow.web.common import (
    TRAINING_DAG_ID,
    bucket_url,
    can_read_training,
    current_storage_options,
    default_bucket,
    run_conf,
)
from tasks.core import layout, storage

#: A dataset version or run name as it appears in the report's path.
PATH_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
#: A stored report is shown, never trusted: no script, no same-origin access, no MIME sniffing.
REPORT_HEADERS = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff",
                  "Cache-Control": "no-store"}


def report_router() -> APIRouter:
    """The route that serves evaluation reports (path below ``/bgremoval``)."""
    router = APIRouter()
    bucket_default = default_bucket()

    @router.get("/reports/{version}/{run}", response_class=HTMLResponse, dependencies=[can_read_training])
    def report(version: str, run: str, bucket: str = Query(bucket_default)) -> HTMLResponse:
        """The stored evaluation report of a training run, as it was written."""
        if not (PATH_PART.match(version) and PATH_PART.match(run) and layout.run_name(run) == run):
            raise HTTPException(422, "malformed dataset version or run")
        url = layout.report_page(layout.training_run(bucket_url(bucket), version, run))
        options = current_storage_options()
        if not storage.exists(url, options):
            raise HTTPException(404, f"no report at {url}")
        return HTMLResponse(storage.read_bytes(url, options).decode("utf-8"), headers=REPORT_HEADERS)

    @router.get("/reports/runs/{dag_id}/{run_id}", dependencies=[can_read_training])
    def report_of_run(request: Request, dag_id: str, run_id: str):
        """The evaluation report of one Airflow run: a redirect to its page, or a line saying why
        there is none (yet)."""
        if dag_id != TRAINING_DAG_ID:
            return PlainTextResponse(f"Evaluation reports belong to runs of {TRAINING_DAG_ID}, not {dag_id}.", 404)
        conf = run_conf(dag_id, run_id)
        if conf is None:
            raise HTTPException(404, f"no run {run_id!r} of {dag_id}")
        bucket = str(conf.get("bucket") or bucket_default)
        run = layout.run_name(run_id)
        root = storage.join(bucket_url(bucket), layout.TRAINING)
        options = current_storage_options()
        for version in reversed(storage.list_folders(root, options)):
            if PATH_PART.match(version) and storage.exists(
                    layout.report_page(layout.training_run(bucket_url(bucket), version, run)), options):
                page = request.url_for("report", version=version, run=run).include_query_params(bucket=bucket)
                return RedirectResponse(str(page), status_code=303)
        return PlainTextResponse(f"Run {run_id} has no evaluation report yet: evaluate_model writes it "
                                 f"after training.", 404)

    return router
