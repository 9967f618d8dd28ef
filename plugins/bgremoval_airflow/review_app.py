"""The review web app: reviewers look at the proposed product clusters, move images, rename clusters.

A FastAPI app mounted by the Airflow api-server under ``/bgremoval`` (see ``bgremoval_plugin.py``).
It requires the Airflow UI's login: reading needs read access to the training DAG, saving a
correction needs the right to answer its human-in-the-loop tasks. Every change goes to
``datasets/<version>/review/corrections.jsonl`` through :mod:`tasks.data.review`, with who and when.

Routes (all below ``/bgremoval``):

* ``GET  /review/{version}?bucket=B``                      the page
* ``GET  /api/datasets/{version}/clusters?bucket=B``       clusters, names, members, corrections
* ``GET  /api/datasets/{version}/thumbnails/{key}?bucket=B`` JPEG thumbnail with the mask outline
* ``POST /api/datasets/{version}/corrections?bucket=B``    ``{"action": "move", "key", "to_cluster"}``
  or ``{"action": "rename", "cluster", "name"}``

Masks flagged by the mask audit (page rendered from ``templates/mask_review.html``):

* ``GET  /review/{version}/masks?bucket=B``                 the page "Masks to check"
* ``GET  /api/datasets/{version}/masks?bucket=B``           flagged pairs, reasons, decisions, counts
* ``GET  /api/datasets/{version}/masks/{key}/thumbnail?bucket=B[&fixed=true]`` JPEG, mask overlaid
* ``POST /api/datasets/{version}/masks/{key}?bucket=B``     ``{"decision": "keep" | "exclude"}``
* ``POST /api/datasets/{version}/masks/{key}/fix?bucket=B`` multipart ``file``: the corrected mask PNG
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Literal

import jinja2
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from bgremoval_airflow.params import DEFAULT_BUCKET
from bgremoval_airflow.web_common import BUCKET_NAME, TRAINING_DAG_ID, current_storage_options

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_KEY = re.compile(r"^[A-Za-z0-9._-]{1,200}$")

can_read = Depends(requires_access_dag("GET", param_dag_id=TRAINING_DAG_ID))
can_review = Depends(requires_access_dag("PUT", DagAccessEntity.HITL_DETAIL, param_dag_id=TRAINING_DAG_ID))


_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)


class MaskDecisionIn(BaseModel):
    """A reviewer's answer to a flagged mask (``fix`` goes through the upload endpoint)."""

    decision: Literal["keep", "exclude"]


class CorrectionIn(BaseModel):
    """A reviewer's action as posted by the page."""

    action: Literal["move", "rename"]
    key: str | None = Field(default=None, max_length=200)
    to_cluster: int | None = None
    cluster: int | None = None
    name: str | None = Field(default=None, max_length=60)


def dataset_url(version: str, bucket: str) -> str:
    """``s3://<bucket>/datasets/<version>`` after validating both names (no path tricks)."""
    if not _VERSION.match(version):
        raise HTTPException(status_code=400, detail=f"invalid dataset version {version!r}")
    if not BUCKET_NAME.match(bucket):
        raise HTTPException(status_code=400, detail=f"invalid bucket name {bucket!r}")
    return f"s3://{bucket}/datasets/{version}"


def _state_json(state, version: str, bucket: str) -> dict:
    sizes = state.sizes()
    clusters = [
        {
            "cluster": c,
            "name": state.names[c],
            "size": sizes[c],
            "members": [
                {
                    "key": key,
                    "stem": state.stems[key],
                    "moved": state.proposed[key] != c,
                    "thumbnail": f"api/datasets/{version}/thumbnails/{key}?bucket={bucket}",
                }
                for key in state.members(c)
            ],
        }
        for c in sorted(state.names)
    ]
    return {
        "version": version,
        "bucket": bucket,
        "clusters": clusters,
        "moved": len(state.moved()),
        "corrections": [
            {k: v for k, v in vars(c).items() if v is not None} for c in state.corrections[-50:]
        ],
        "n_corrections": len(state.corrections),
        "masks_flagged": len(state.flagged),
        "masks_undecided": len(state.flagged) - len(state.mask_decisions),
    }


def _masks_json(state, version: str, bucket: str) -> dict:
    """The flagged pairs (with thumbnail links relative to ``/bgremoval/``) and the decision counts."""
    pairs = state.flagged_pairs()
    for pair in pairs:
        thumbnail = f"api/datasets/{version}/masks/{pair['key']}/thumbnail?bucket={bucket}"
        pair["thumbnail"] = thumbnail + ("&fixed=true" if pair["decision"] == "fix" else "")
    counts = {d: sum(p["decision"] == d for p in pairs) for d in ("keep", "exclude", "fix")}
    return {
        "version": version,
        "bucket": bucket,
        "pairs": pairs,
        "flagged": len(pairs),
        "decided": counts,
        "undecided": len(pairs) - sum(counts.values()),
    }


def _load_state(version: str, bucket: str):
    from tasks.data.review import load_review_state

    try:
        return load_review_state(dataset_url(version, bucket), current_storage_options())
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def create_app() -> FastAPI:
    """Build the review app (mounted by the plugin; also used directly in tests)."""
    app = FastAPI(title="bgremoval review", description=__doc__)

    @app.exception_handler(HTTPException)
    async def login_redirect(request: Request, exc: HTTPException):
        is_page = "/api/" not in request.url.path
        if exc.status_code == 401 and is_page and request.method == "GET":
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    from bgremoval_airflow.correction_app import correction_router

    app.include_router(correction_router())  # the mask-correction page and its API
    from bgremoval_airflow.report_app import report_router

    app.include_router(report_router())  # evaluation reports, linked from evaluate_model's log

    @app.get("/", response_class=HTMLResponse, dependencies=[can_read])
    def index(bucket: str = Query(DEFAULT_BUCKET)) -> str:
        from tasks.core import storage

        root = f"s3://{bucket}/datasets" if BUCKET_NAME.match(bucket) else None
        if root is None:
            raise HTTPException(status_code=400, detail=f"invalid bucket name {bucket!r}")
        versions = sorted(
            {o.relpath.split("/")[0] for o in storage.list_objects(root, current_storage_options()) if o.relpath.endswith("clusters/assignments.parquet")}
        )
        items = "".join(
            f'<li><a href="review/{html.escape(v)}?bucket={html.escape(bucket)}">{html.escape(v)}</a></li>' for v in versions
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>bgremoval review</title></head>"
            "<body style='font-family:system-ui,sans-serif;margin:20px'><h1>Datasets with proposed clusters</h1>"
            f"<p>bucket {html.escape(bucket)}</p><ul>{items or '<li>none yet</li>'}</ul></body></html>"
        )

    @app.get("/api/datasets/{version}/clusters", dependencies=[can_read])
    def get_clusters(version: str, bucket: str = Query(DEFAULT_BUCKET)) -> dict:
        return _state_json(_load_state(version, bucket), version, bucket)

    @app.get("/api/datasets/{version}/thumbnails/{key}", dependencies=[can_read])
    def get_thumbnail(version: str, key: str, bucket: str = Query(DEFAULT_BUCKET)) -> Response:
        from tasks.core import storage
        from tasks.data.ingest import clean_urls
        from tasks.data.review import thumbnail_jpeg

        if not _KEY.match(key):
            raise HTTPException(status_code=400, detail="invalid key")
        image_url, mask_url = clean_urls(dataset_url(version, bucket), key)
        options = current_storage_options()
        try:
            data = thumbnail_jpeg(storage.read_bytes(image_url, options), storage.read_bytes(mask_url, options))
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail=f"no clean pair {key!r}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/datasets/{version}/corrections", dependencies=[can_review])
    def post_correction(version: str, body: CorrectionIn, user: GetUserDep, bucket: str = Query(DEFAULT_BUCKET)) -> dict:
        from tasks.data.review import CorrectionError, record_correction

        fields = {k: v for k, v in body.model_dump().items() if k != "action" and v is not None}
        try:
            state = record_correction(
                dataset_url(version, bucket), body.action, user.get_name(), current_storage_options(), **fields
            )
        except CorrectionError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        except FileNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return _state_json(state, version, bucket)

    @app.get("/api/datasets/{version}/masks", dependencies=[can_read])
    def get_masks(version: str, bucket: str = Query(DEFAULT_BUCKET)) -> dict:
        return _masks_json(_load_state(version, bucket), version, bucket)

    @app.get("/api/datasets/{version}/masks/{key}/thumbnail", dependencies=[can_read])
    def get_mask_thumbnail(version: str, key: str, bucket: str = Query(DEFAULT_BUCKET), fixed: bool = Query(False)) -> Response:
        from tasks.core import storage
        from tasks.data.ingest import clean_urls
        from tasks.data.review import fixed_mask_url, thumbnail_jpeg

        if not _KEY.match(key):
            raise HTTPException(status_code=400, detail="invalid key")
        url = dataset_url(version, bucket)
        image_url, mask_url = clean_urls(url, key)
        options = current_storage_options()
        try:
            mask = storage.read_bytes(fixed_mask_url(url, key) if fixed else mask_url, options)
            data = thumbnail_jpeg(storage.read_bytes(image_url, options), mask, size=240, overlay=True)
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail=f"no {'fixed mask' if fixed else 'clean pair'} {key!r}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store" if fixed else "private, max-age=3600"})

    @app.post("/api/datasets/{version}/masks/{key}", dependencies=[can_review])
    def post_mask_decision(
        version: str, key: str, body: MaskDecisionIn, user: GetUserDep, bucket: str = Query(DEFAULT_BUCKET)
    ) -> dict:
        from tasks.data.review import CorrectionError, record_correction

        if not _KEY.match(key):
            raise HTTPException(status_code=400, detail="invalid key")
        try:
            state = record_correction(
                dataset_url(version, bucket), "mask", user.get_name(), current_storage_options(), key=key, decision=body.decision
            )
        except CorrectionError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        except FileNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return _masks_json(state, version, bucket)

    @app.post("/api/datasets/{version}/masks/{key}/fix", dependencies=[can_review])
    def post_mask_fix(
        version: str,
        key: str,
        user: GetUserDep,
        file: UploadFile = File(..., description="the corrected mask: a PNG of the clean pair's size, white = product"),
        bucket: str = Query(DEFAULT_BUCKET),
    ) -> dict:
        from tasks.data.review import MAX_FIXED_MASK_BYTES, CorrectionError, save_fixed_mask

        if not _KEY.match(key):
            raise HTTPException(status_code=400, detail="invalid key")
        data = file.file.read(MAX_FIXED_MASK_BYTES + 1)
        if len(data) > MAX_FIXED_MASK_BYTES:
            raise HTTPException(status_code=413, detail=f"mask file larger than {MAX_FIXED_MASK_BYTES // 2**20} MiB")
        try:
            state = save_fixed_mask(dataset_url(version, bucket), key, data, user.get_name(), current_storage_options())
        except CorrectionError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        except FileNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return _masks_json(state, version, bucket)

    @app.get("/review/{version}/masks", response_class=HTMLResponse, dependencies=[can_read])
    def mask_review_page(version: str, user: GetUserDep, bucket: str = Query(DEFAULT_BUCKET)) -> str:
        masks = _masks_json(_load_state(version, bucket), version, bucket)
        return _TEMPLATES.get_template("mask_review.html").render(user=user.get_name(), base="../../", **masks)

    @app.get("/review/{version}", response_class=HTMLResponse, dependencies=[can_read])
    def review_page(version: str, user: GetUserDep, bucket: str = Query(DEFAULT_BUCKET)) -> str:
        dataset_url(version, bucket)
        return REVIEW_PAGE.replace("{{VERSION}}", html.escape(version)).replace("{{BUCKET}}", html.escape(bucket)).replace(
            "{{USER}}", html.escape(user.get_name())
        )

    return app


REVIEW_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Review clusters · {{VERSION}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #f5f6f8; color: #1d2433; }
 header { background: #017cee; color: white; padding: 12px 20px; display: flex; gap: 24px; align-items: baseline; }
 header h1 { font-size: 18px; margin: 0; } header span { opacity: .9; font-size: 14px; }
 #status { margin-left: auto; font-weight: 600; }
 main { padding: 16px 20px; }
 .help { font-size: 14px; color: #4a5568; margin: 0 0 12px; }
 .cluster { background: white; border-radius: 8px; margin-bottom: 16px; padding: 12px; box-shadow: 0 1px 2px #0002; }
 .cluster h2 { font-size: 16px; margin: 0 0 8px; display: flex; gap: 8px; align-items: center; }
 .cluster h2 input { font-size: 15px; padding: 3px 6px; width: 260px; }
 .grid { display: flex; flex-wrap: wrap; gap: 8px; }
 .card { width: 150px; border: 1px solid #d9dde3; border-radius: 6px; padding: 4px; background: #fafbfc; font-size: 12px; }
 .card.moved { border-color: #e8590c; background: #fff4e6; }
 .card img { width: 150px; height: 150px; object-fit: contain; background: #eee; display: block; }
 .card .stem { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; margin: 3px 0; }
 .card select { width: 100%; font-size: 12px; }
 button { cursor: pointer; }
 #log { font-size: 12px; color: #4a5568; }
</style></head>
<body>
<header><h1>bgremoval · review product clusters</h1><span>dataset {{VERSION}} · bucket {{BUCKET}} · signed in as {{USER}}</span>
<span id="status" role="status">loading…</span></header>
<main>
<p class="help">Move an image with its <b>Move to</b> menu; rename a cluster and press <b>Rename</b>. Every change is saved at once,
with your name, to <code>review/corrections.jsonl</code>. When the clusters are right, open Airflow's <b>Required Actions</b>
and choose <b>Approve</b> (or <b>Reject</b> to end the run without training).</p>
<p><a id="masks-link" href="{{VERSION}}/masks?bucket={{BUCKET}}">Masks to check</a></p>
<div id="clusters"></div>
<h3>Recent corrections</h3><ol id="log"></ol>
</main>
<script>
const version = "{{VERSION}}", bucket = "{{BUCKET}}";
const base = new URL("../", window.location.href);
const api = (path) => new URL(path, base).toString();
const status = document.getElementById("status");
let state = null;

async function load() {
  const r = await fetch(api(`api/datasets/${version}/clusters?bucket=${bucket}`), {credentials: "same-origin"});
  if (!r.ok) { status.textContent = `error ${r.status}`; return; }
  state = await r.json(); render(); status.textContent = `${state.n_corrections} corrections · ${state.moved} moved`;
  document.getElementById("masks-link").textContent =
    `Masks to check: ${state.masks_flagged} flagged by the audit, ${state.masks_undecided} undecided`;
}

async function send(body) {
  status.textContent = "saving…";
  const r = await fetch(api(`api/datasets/${version}/corrections?bucket=${bucket}`), {
    method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) { status.textContent = `not saved: ${data.detail}`; return; }
  state = data; render();
  status.textContent = `saved ✓ · ${state.n_corrections} corrections · ${state.moved} moved`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) { if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v); }
  for (const c of children) node.append(c);
  return node;
}

function render() {
  const root = document.getElementById("clusters"); root.replaceChildren();
  for (const c of state.clusters) {
    const name = el("input", {value: c.name, "aria-label": `name of cluster ${c.cluster}`, "data-cluster": c.cluster});
    const rename = el("button", {onclick: () => send({action: "rename", cluster: c.cluster, name: name.value})}, "Rename");
    const grid = el("div", {class: "grid"});
    for (const m of c.members) {
      const select = el("select", {"aria-label": `move ${m.stem}`, "data-key": m.key,
        onchange: (e) => send({action: "move", key: m.key, to_cluster: Number(e.target.value)})});
      select.append(el("option", {value: c.cluster, selected: "selected"}, "Move to…"));
      for (const o of state.clusters) if (o.cluster !== c.cluster) select.append(el("option", {value: o.cluster}, `${o.cluster}: ${o.name}`));
      grid.append(el("div", {class: m.moved ? "card moved" : "card", "data-key": m.key},
        el("img", {src: api(m.thumbnail), alt: m.stem, loading: "lazy"}), el("div", {class: "stem", title: m.stem}, m.stem), select));
    }
    root.append(el("section", {class: "cluster", "data-cluster": c.cluster},
      el("h2", {}, `Cluster ${c.cluster} · ${c.size} images · `, name, rename), grid));
  }
  const log = document.getElementById("log"); log.replaceChildren();
  for (const c of state.corrections.slice().reverse())
    log.append(el("li", {}, `${c.at} ${c.user}: ` + (c.action === "move" ? `moved ${c.key} to cluster ${c.to_cluster}` :
      c.action === "mask" ? `mask of ${c.key}: ${c.decision}` : `renamed cluster ${c.cluster} to "${c.name}"`)));
}
load();
</script></body></html>
"""
