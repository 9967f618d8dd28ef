"""The body cap answers 413 before a route (or the login check) reads a body: from the declared
``Content-Length``, and for a chunked body as soon as it passes the cap."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from bgremoval_airflow.web.app import create_app
from bgremoval_airflow.web.limits import MAX_BODY_BYTES, BodySizeLimit
from tasks.feedback.config import MAX_MASK_BYTES


def echo_app(max_bytes: int) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    return app


def test_the_cap_fits_the_largest_legitimate_body():
    assert 4 * MAX_MASK_BYTES // 3 < MAX_BODY_BYTES < 64 * 2**20


def test_a_declared_body_over_the_cap_is_refused_before_login():
    client = TestClient(create_app())
    too_big = client.post("/api/corrections/i1/upload", headers={"Content-Length": str(MAX_BODY_BYTES + 1)},
                          content=b"x")
    assert too_big.status_code == 413 and "larger than" in too_big.json()["detail"]
    small = client.post("/api/corrections/i1/decision", json={"decision": "rejected"})
    assert small.status_code == 401  # within the cap, the login check answers as before


def test_bodies_at_the_cap_pass_and_chunked_bodies_over_it_stop():
    client = TestClient(echo_app(1000))
    assert client.post("/echo", content=b"x" * 1000).json() == {"size": 1000}
    assert client.post("/echo", content=b"x" * 1001).status_code == 413

    def chunks():
        for _ in range(50):
            yield b"x" * 100

    streamed = client.post("/echo", content=chunks())  # no Content-Length: Transfer-Encoding chunked
    assert streamed.status_code == 413
    assert client.post("/echo", headers={"Content-Length": "many"}, content=b"").status_code == 400


def test_a_change_a_browser_sends_from_another_origin_is_refused_before_login():
    """A form on another page of the same site (another port or subdomain) would carry the login cookie:
    browsers say so in Sec-Fetch-Site (or, older ones, Origin) and the request is refused; the pages' own
    fetch calls (same-origin), reads and scripts without those headers go on to the login check."""
    client = TestClient(create_app())
    upload = "/api/corrections/i1/upload"
    for headers in ({"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://other.example:8080"}):
        refused = client.post(upload, headers=headers, files={"file": ("m.png", b"x", "image/png")})
        assert refused.status_code == 403 and "refused" in refused.json()["detail"], headers
    for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Origin": "http://testserver"}, {}):
        assert client.post(upload, headers=headers, files={"file": ("m.png", b"x", "image/png")}).status_code == 401
    assert client.get("/api/corrections", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 401
