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
"""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse

from bgremoval_airflow.web.common import bucket_url, can_read_training, current_storage_options, default_bucket
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

    return router
