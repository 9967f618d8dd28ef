"""The web package without servers: the app serves the same routes, every page's template renders
(escaped, values for scripts as JSON), the report route builds its location with
:mod:`tasks.core.layout`, and the package keeps its rules (no HTML in Python, no private imports
across modules, templates shipped next to the code)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from bgremoval_airflow.web import common, reports
from bgremoval_airflow.web.app import create_app

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
AWKWARD = 'a<b>&"c\'</script>'


@pytest.fixture(scope="module")
def app():
    return create_app()


def test_the_app_serves_every_route_it_served_before_the_move(app):
    routes = {(m, r.path) for r in app.routes if r.path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
              for m in r.methods}
    assert routes == {
        ("GET", "/"),
        ("GET", "/review/{version}"),
        ("GET", "/api/datasets/{version}/clusters"),
        ("GET", "/api/datasets/{version}/thumbnails/{key}"),
        ("POST", "/api/datasets/{version}/corrections"),
        ("GET", "/review/{version}/masks"),
        ("GET", "/api/datasets/{version}/masks"),
        ("GET", "/api/datasets/{version}/masks/{key}/thumbnail"),
        ("POST", "/api/datasets/{version}/masks/{key}"),
        ("POST", "/api/datasets/{version}/masks/{key}/fix"),
        ("GET", "/corrections"),
        ("GET", "/corrections/{item_id}"),
        ("GET", "/api/corrections"),
        ("GET", "/api/corrections/{item_id}"),
        ("GET", "/api/corrections/{item_id}/image"),
        ("GET", "/api/corrections/{item_id}/mask"),
        ("GET", "/api/corrections/{item_id}/final-mask"),
        ("GET", "/api/corrections/{item_id}/thumbnail"),
        ("POST", "/api/corrections/{item_id}/decision"),
        ("POST", "/api/corrections/{item_id}/upload"),
        ("GET", "/reports/{version}/{run}"),
        ("GET", "/reports/runs/{dag_id}/{run_id}"),
    }


def test_every_template_is_shipped_next_to_the_code():
    names = {p.name for p in common.TEMPLATES_DIR.glob("*.html")}
    assert common.TEMPLATES_DIR == PLUGINS / "bgremoval_airflow" / "web" / "templates"
    assert {"base.html", "dataset_index.html", "cluster_review.html", "mask_review.html",
            "correction_queue.html", "correction_editor.html"} <= names
    used = set()
    for module in (PLUGINS / "bgremoval_airflow" / "web").glob("*.py"):
        used |= set(re.findall(r'render_page\(\s*"([^"]+)"', module.read_text()))
    assert used and used <= names


def test_cluster_review_page_escapes_text_and_hands_the_script_json():
    page = common.render_page("cluster_review.html", version="v1", bucket="my-bucket", user=AWKWARD)
    assert 'const version = "v1", bucket = "my-bucket";' in page
    assert '<a id="masks-link" href="v1/masks?bucket=my-bucket">' in page
    assert "signed in as a&lt;b&gt;&amp;&#34;c&#39;&lt;/script&gt;" in page
    assert AWKWARD not in page
    for element in ('id="status"', 'id="clusters"', 'id="log"', "api/datasets/${version}/clusters?bucket=${bucket}"):
        assert element in page
    script = common.render_page("cluster_review.html", version=AWKWARD, bucket="b", user="u")
    literal = re.search(r"const version = (.*), bucket = ", script).group(1)
    assert json.loads(literal) == AWKWARD and "</script>" not in literal


def test_mask_review_page_lists_the_flagged_pairs():
    pair = {"key": "k1", "stem": "shirt", "reasons": ["holes"], "cluster": 0, "cluster_name": "tops", "size": "40×30",
            "decision": "keep",
            "decided_by": "ann", "decided_at": "2030-01-01T00:00:00", "thumbnail": "api/datasets/v1/masks/k1/thumbnail?bucket=b"}
    page = common.render_page("mask_review.html", version="v1", bucket="b", user="ann", base="../../", pairs=[pair],
                              flagged=1, decided={"keep": 1, "exclude": 0, "fix": 0}, undecided=0, closed=False)
    assert '<article class="tile keep" data-key="k1" data-decision="keep">' in page
    assert '<img src="../../api/datasets/v1/masks/k1/thumbnail?bucket=b"' in page
    assert '<li title="holes that look like product">holes</li>' in page and "kept by ann" in page
    assert "cluster 0 · tops · 40×30 px" in page  # the size a corrected mask may have (or the photo's own)
    assert 'const base = new URL("../../", window.location.href);' in page
    empty = common.render_page("mask_review.html", version="v1", bucket="b", user="ann", base="../../", pairs=[],
                               flagged=0, decided={}, undecided=0, closed=False)
    assert 'id="none"' in empty


def test_correction_queue_page_has_one_card_per_item_and_a_toggle():
    item = {"item_id": "i1", "stem": "dress<1>", "batch": "web-7", "score": 0.51234, "threshold": 0.8, "status": "accepted",
            "decision": {"user": "bob"}, "links": {"page": "corrections/i1?bucket=b", "thumbnail": "api/corrections/i1/thumbnail?bucket=b"}}
    opened = {**item, "item_id": "i2", "status": "open", "decision": None}
    page = common.render_page("correction_queue.html", items=[item, opened], n_open=1, total=2, page=1, pages=1,
                              include_done=True, bucket="b", user="ann")
    assert '<a class="card accepted" href="corrections/i1?bucket=b" data-item="i1">' in page
    assert 'data-item="i2"' in page and "score <b>0.512</b> (threshold 0.800)" in page
    assert "accepted by bob" in page and "dress&lt;1&gt;" in page
    assert '<span id="status" role="status">1 open · 1 decided</span>' in page
    assert '<a href="corrections?bucket=b">show open items only</a>' in page
    empty = common.render_page("correction_queue.html", items=[], n_open=0, total=0, page=1, pages=1, include_done=False,
                               bucket="b", user="ann")
    assert "the queue is empty" in empty and '<span id="status" role="status">0 open</span>' in empty
    assert '<a href="corrections?bucket=b&amp;show=all">show decided items too</a>' in empty
    assert "page 1 of" not in page
    middle = common.render_page("correction_queue.html", items=[opened], n_open=100, total=100, page=2, pages=3,
                                include_done=True, bucket="b", user="ann")
    assert "page 2 of 3" in middle and '<a rel="prev" href="corrections?bucket=b&amp;show=all&amp;page=1">' in middle
    assert '<a rel="next" href="corrections?bucket=b&amp;show=all&amp;page=3">' in middle


def test_correction_editor_page_hands_the_item_to_the_script_in_body_data():
    page = common.render_page("correction_editor.html", item_id="i1", bucket="b", user="ann",
                              aspect_tolerance=0.01)
    assert '<body data-item="i1" data-bucket="b">' in page
    assert '<canvas id="editor"' in page and "Save correction" in page
    assert "const itemId = document.body.dataset.item, bucket = document.body.dataset.bucket;" in page
    assert "const ASPECT_TOLERANCE = 0.01;" in page


def test_dataset_index_links_each_version_with_clusters_and_pages():
    versions = [{"name": "v1", "status": "waiting"}, {"name": "v2", "status": "rejected"},
                {"name": "v3", "status": "no clusters"}, {"name": "v4", "status": "approved"}]
    page = common.render_page("dataset_index.html", bucket="b", versions=versions, page=1, pages=2, total=53)
    assert '<a href="review/v1?bucket=b">v1</a>' in page and '<a href="review/v2?bucket=b">v2</a>' in page
    assert "v3 (no clusters proposed yet)" in page and "53 dataset\nversions" in page
    assert ">waiting for review<" in page and ">rejected: a new run asks again<" in page and ">approved<" in page
    assert '<a rel="next" href="?bucket=b&amp;page=2">' in page and 'rel="prev"' not in page
    assert "none yet" in common.render_page("dataset_index.html", bucket="b", versions=[], page=1, pages=1, total=0)


def test_names_are_validated_before_any_location_is_built():
    with pytest.raises(HTTPException) as bad_version:
        common.dataset_url("../x", "bgremoval")
    assert bad_version.value.status_code == 400
    with pytest.raises(HTTPException) as bad_bucket:
        common.dataset_url("v1", "Not_A_Bucket")
    assert bad_bucket.value.status_code == 400
    assert common.dataset_url("v1", "bgremoval") == "s3://bgremoval/datasets/v1"
    assert common.check_key("a.b-c_1") == "a.b-c_1"
    with pytest.raises(HTTPException):
        common.check_key("a/b")


def test_report_route_reads_the_report_where_layout_puts_it_and_serves_it_sandboxed(app, monkeypatch):
    read = []
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__BUCKETS", "my-bucket")
    monkeypatch.setattr(reports, "current_storage_options", lambda: {})
    monkeypatch.setattr(reports.storage, "exists", lambda url, options: url.endswith("/present/report/report.html"))
    monkeypatch.setattr(reports.storage, "read_bytes", lambda url, options: read.append(url) or b"<p>report</p>")
    app.dependency_overrides[common.can_read_training.dependency] = lambda: None
    try:
        client = TestClient(app)
        found = client.get("/reports/v1/present?bucket=my-bucket")
        assert found.status_code == 200 and found.text == "<p>report</p>"
        assert found.headers["content-security-policy"] == "sandbox"
        assert found.headers["x-content-type-options"] == "nosniff"
        assert read == ["s3://my-bucket/training/v1/present/report/report.html"]
        assert client.get("/reports/v1/absent?bucket=my-bucket").status_code == 404
        for path in ("/reports/v1/a.b?bucket=my-bucket", "/reports/.v1/r?bucket=my-bucket"):
            assert client.get(path).status_code == 422, path
        for bucket in ("Bad_Bucket", "someone-elses-bucket"):
            refused = client.get(f"/reports/v1/present?bucket={bucket}")
            assert refused.status_code == 400, bucket
        assert len(read) == 1  # nothing was read from a bucket this deployment does not serve
    finally:
        app.dependency_overrides.clear()


def test_a_runs_report_is_found_in_the_bucket_of_its_conf_and_redirected_to(app, monkeypatch, tmp_path):
    runs = {"manual__2026-12-01T10:00:00+00:00": {"bucket": "my-bucket"}, "manual__old": {},
            "manual__elsewhere": {"bucket": "someone-elses-bucket"}}
    root = tmp_path / "my-bucket"
    for version, run in (("v1", "manual__2026-12-01T10-00-00-00-00"), ("v2", "other")):
        (root / "training" / version / run / "report").mkdir(parents=True)
        (root / "training" / version / run / "report" / "report.html").write_text("<p>report</p>")
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__BUCKETS", "my-bucket")
    monkeypatch.setattr(reports, "run_conf", lambda dag_id, run_id: runs.get(run_id))
    monkeypatch.setattr(reports, "bucket_url", lambda bucket: common.bucket_url(bucket).replace("s3://", f"{tmp_path}/"))
    monkeypatch.setattr(reports, "current_storage_options", lambda: None)
    app.dependency_overrides[common.can_read_training.dependency] = lambda: None
    try:
        client = TestClient(app)
        found = client.get("/reports/runs/bgremoval_training/manual__2026-12-01T10:00:00+00:00", follow_redirects=False)
        assert found.status_code == 303
        assert found.headers["location"].endswith("/reports/v1/manual__2026-12-01T10-00-00-00-00?bucket=my-bucket")
        assert client.get(found.headers["location"]).text == "<p>report</p>"
        not_yet = client.get("/reports/runs/bgremoval_training/manual__old")  # default bucket: no report there
        assert not_yet.status_code == 404 and "no evaluation report yet" in not_yet.text
        assert client.get("/reports/runs/bgremoval_training/manual__missing").status_code == 404
        assert client.get("/reports/runs/bgremoval_training/manual__elsewhere").status_code == 400
        other_dag = client.get("/reports/runs/bgremoval_inference/manual__old")
        assert other_dag.status_code == 404 and "belong to runs of bgremoval_training" in other_dag.text
    finally:
        app.dependency_overrides.clear()


def test_only_the_configured_buckets_and_patterns_are_served(monkeypatch):
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__BUCKET", "shop-images")
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__BUCKETS", "studio-*, archive")
    assert common.bucket_url("shop-images") == "s3://shop-images"
    assert common.bucket_url("studio-berlin") == "s3://studio-berlin"
    assert common.bucket_url("archive") == "s3://archive"
    for other in ("bgremoval", "archive-2", "someone-elses-bucket"):
        with pytest.raises(HTTPException) as refused:
            common.dataset_url("v1", other)
        assert refused.value.status_code == 400 and "not served" in refused.value.detail


def test_no_docs_or_openapi_for_anyone(app):
    client = TestClient(app)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path


def test_no_html_or_script_in_python_modules():
    for module in PLUGINS.rglob("*.py"):
        text = module.read_text()
        assert not re.search(r"<html|<div|<script", text), f"{module}: markup belongs in a template"


def test_no_module_imports_a_private_name_from_another():
    for module in PLUGINS.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{module}: imports {private} from {node.module}"
