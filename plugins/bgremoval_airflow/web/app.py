"""The plugin's web app: one FastAPI app that the Airflow api-server mounts under ``/bgremoval``
(see ``bgremoval_plugin.py``), with the same login as the Airflow UI.

This module only assembles it: one router per page, each with its API and its routes listed in its
module docstring, :mod:`bgremoval_airflow.web.clusters` (cluster review, and the start page),
:mod:`bgremoval_airflow.web.masks` (masks to check), :mod:`bgremoval_airflow.web.corrections`
(the correction queue and editor) and :mod:`bgremoval_airflow.web.reports` (evaluation reports);
what they share is in :mod:`bgremoval_airflow.web.common`, the pages' HTML in ``templates/``.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse

from bgremoval_airflow.web.clusters import cluster_router
from bgremoval_airflow.web.corrections import correction_router
from bgremoval_airflow.web.limits import BodySizeLimit, CrossSiteRefusal
from bgremoval_airflow.web.masks import mask_router
from bgremoval_airflow.web.reports import report_router


def create_app() -> FastAPI:
    """Build the app (mounted by the plugin; also usable directly in tests).

    A page (not an ``/api/`` path) asked for without a login redirects to the Airflow login page and
    back; every other error answers JSON ``{"detail": ...}``. There are no docs or OpenAPI pages (they
    would answer without a login); a body over :data:`bgremoval_airflow.web.limits.MAX_BODY_BYTES`
    is refused with 413 before it is read, and a change a browser sent from another origin with 403
    (:class:`bgremoval_airflow.web.limits.CrossSiteRefusal`).
    """
    app = FastAPI(title="bgremoval review", description=__doc__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def login_redirect(request: Request, exc: HTTPException):
        is_page = "/api/" not in request.url.path
        if exc.status_code == 401 and is_page and request.method == "GET":
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    app.add_middleware(BodySizeLimit)  # before routing, so before the login check reads a body
    app.add_middleware(CrossSiteRefusal)  # added last, so it runs first: no other site's form gets in
    app.include_router(correction_router())  # the mask-correction pages and their API
    app.include_router(report_router())  # evaluation reports, linked from evaluate_model's log
    app.include_router(cluster_router())  # the start page, the cluster review page and its API
    app.include_router(mask_router())  # masks flagged by the mask audit
    return app
