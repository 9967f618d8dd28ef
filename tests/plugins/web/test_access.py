"""Every plugin route on a real Airflow api-server, asked anonymously, for a bucket this deployment
does not serve, and with an oversized body: each is refused, and the table of status codes is
printed (``pytest -s``) for the record."""

from __future__ import annotations

import re
import socket
from urllib.parse import urlparse

import httpx
import pytest

from bgremoval_airflow.web.app import create_app

pytestmark = pytest.mark.process

PLACEHOLDERS = {"version": "v1", "run": "r1", "key": "k1", "item_id": "i1", "dag_id": "bgremoval_training",
                "run_id": "manual__none"}
#: Routes that take no ``?bucket=``: the bucket comes from the Airflow run's conf (checked in test_app.py);
#: asked for a run that does not exist they answer 404.
BUCKET_FROM_RUN = {"/reports/runs/{dag_id}/{run_id}"}
#: A valid body for each POST route, so that what answers is the access check, not validation.
BODIES = {
    "/api/datasets/{version}/corrections": {"json": {"action": "rename", "cluster": 0, "name": "x"}},
    "/api/datasets/{version}/masks/{key}": {"json": {"decision": "keep"}},
    "/api/datasets/{version}/masks/{key}/fix": {"files": {"file": ("m.png", b"\x89PNG", "image/png")}},
    "/api/corrections/{item_id}/decision": {"json": {"decision": "rejected"}},
    "/api/corrections/{item_id}/upload": {"files": {"file": ("m.png", b"\x89PNG", "image/png")}},
}


def plugin_routes() -> list[tuple[str, str]]:
    return sorted((method, route.path) for route in create_app().routes for method in route.methods - {"HEAD"})


def ask(base: str, method: str, template: str, bucket: str, token: str | None) -> int:
    path = re.sub(r"\{(\w+)\}", lambda m: PLACEHOLDERS[m.group(1)], template)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.request(method, f"{base}/bgremoval{path}", params={"bucket": bucket}, headers=headers,
                             follow_redirects=False, timeout=60, **BODIES.get(template, {}))
    return response.status_code


def test_anonymous_and_wrong_bucket_requests_are_refused_on_every_route(api_server, client_for, s3_bucket, capsys):
    served = s3_bucket[0].removeprefix("s3://")
    reviewer = client_for("reviewer")
    rows = []
    for method, template in plugin_routes():
        anonymous = ask(api_server, method, template, served, None)
        wrong_bucket = ask(api_server, method, template, "someone-elses-bucket", reviewer.token)
        rows.append((method, template, anonymous, wrong_bucket))
        is_page = "/api/" not in template
        assert anonymous == (303 if is_page and method == "GET" else 401), (method, template, anonymous)
        assert wrong_bucket == (404 if template in BUCKET_FROM_RUN else 400), (method, template, wrong_bucket)
    for path in ("/docs", "/redoc", "/openapi.json"):
        status = httpx.get(f"{api_server}/bgremoval{path}", follow_redirects=False).status_code
        rows.append(("GET", path, status, status))
        assert status == 404, path
    with capsys.disabled():
        print("\nroute | anonymous | reviewer, bucket someone-elses-bucket")
        for method, template, anonymous, wrong_bucket in rows:
            print(f"{method} /bgremoval{template} | {anonymous} | {wrong_bucket}")


def test_an_oversized_upload_is_refused_before_its_body_is_sent(api_server):
    address = urlparse(api_server)
    request = (b"POST /bgremoval/api/corrections/i1/upload HTTP/1.1\r\n"
               b"Host: " + address.netloc.encode() + b"\r\n"
               b"Content-Type: multipart/form-data; boundary=x\r\n"
               b"Content-Length: 1073741824\r\n\r\n")
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(request)  # the headers only: the promised gigabyte never comes
        answer = connection.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
