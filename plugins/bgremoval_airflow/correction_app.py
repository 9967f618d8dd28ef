"""The correction page: people accept, reject or correct the masks the inference DAG doubted.

Routes added to the review app (``review_app.create_app`` includes :func:`correction_router`),
so they live below ``/bgremoval`` with the same login. Reading needs read access to the
inference DAG; deciding needs the right to answer its human-in-the-loop tasks (simple auth
manager: role ``user`` or higher; a ``viewer`` can look only). Storage is :mod:`tasks.feedback.queue`.

* ``GET  /corrections?bucket=B[&show=all]``           the queue page (thumbnails, score, batch)
* ``GET  /corrections/{item_id}?bucket=B``            the editor: photo + mask overlay, brush, upload
* ``GET  /api/corrections?bucket=B[&include_done=1]`` the queue as JSON
* ``GET  /api/corrections/{item_id}?bucket=B``        one item (+ its decision, the next open item)
* ``GET  /api/corrections/{item_id}/image|mask|final-mask|thumbnail?bucket=B``  JPEG / PNG bytes
* ``POST /api/corrections/{item_id}/decision?bucket=B`` JSON ``{"decision": "accepted" | "rejected" |
  "corrected", "mask_png_base64"?, "mask_source"?: "brush" | "upload", "note"?}``
* ``POST /api/corrections/{item_id}/upload?bucket=B``   multipart ``file`` (a mask PNG) and ``note``:
  saves it as the correction

A decision answers 200 with the ``decision.json`` dict, 409 when the item is already decided
(or being decided), 422 for a mask that does not fit (wrong size, empty, not an image), 404 for an
unknown item.
"""

from __future__ import annotations

import base64
import binascii
import html
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from bgremoval_airflow.params import DEFAULT_BUCKET
from bgremoval_airflow.web_common import BUCKET_NAME, current_storage_options

INFERENCE_DAG_ID = "bgremoval_inference"
MAX_MASK_BYTES = 25 * 2**20

can_read = Depends(requires_access_dag("GET", param_dag_id=INFERENCE_DAG_ID))
can_decide = Depends(requires_access_dag("PUT", DagAccessEntity.HITL_DETAIL, param_dag_id=INFERENCE_DAG_ID))
_IMMUTABLE = {"Cache-Control": "private, max-age=86400"}


class DecisionIn(BaseModel):
    """A decision as posted by the page (or any HTTP client)."""

    decision: Literal["accepted", "rejected", "corrected"]
    mask_png_base64: str | None = Field(default=None, max_length=4 * MAX_MASK_BYTES // 3 + 64)
    mask_source: Literal["brush", "upload"] | None = None
    note: str | None = Field(default=None, max_length=2000)


def bucket_url(bucket: str) -> str:
    """``s3://<bucket>`` after validating the name (400 otherwise)."""
    if not BUCKET_NAME.match(bucket):
        raise HTTPException(status_code=400, detail=f"invalid bucket name {bucket!r}")
    return f"s3://{bucket}"


def _item_id(item_id: str) -> str:
    from tasks.feedback.queue import CorrectionsError, check_id

    try:
        return check_id(item_id)
    except CorrectionsError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


def _decide(bucket: str, item_id: str, user: str, **kwargs) -> dict:
    """Call :func:`tasks.feedback.queue.decide` and turn its errors into HTTP answers."""
    from tasks.feedback.queue import AlreadyDecided, CorrectionsError, decide

    try:
        return decide(bucket_url(bucket), _item_id(item_id), user=user, storage_options=current_storage_options(), **kwargs)
    except AlreadyDecided as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except CorrectionsError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def _links(item_id: str, bucket: str) -> dict:
    """Relative URLs (from ``/bgremoval/``) of an item's page and bytes."""
    api = f"api/corrections/{item_id}"
    return {
        "page": f"corrections/{item_id}?bucket={bucket}",
        "image": f"{api}/image?bucket={bucket}",
        "mask": f"{api}/mask?bucket={bucket}",
        "final_mask": f"{api}/final-mask?bucket={bucket}",
        "thumbnail": f"{api}/thumbnail?bucket={bucket}",
    }


def _queue(bucket: str, include_done: bool) -> list[dict]:
    from tasks.feedback.queue import list_queue

    return [{**item, "links": _links(item["item_id"], bucket)} for item in list_queue(bucket_url(bucket), current_storage_options(), include_done)]


def _item_bytes(bucket: str, item_id: str, name: str) -> bytes:
    from tasks.feedback.queue import read_item_file

    try:
        return read_item_file(bucket_url(bucket), _item_id(item_id), name, current_storage_options())
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def correction_router() -> APIRouter:
    """The correction routes, to be included in the review app (paths below ``/bgremoval``)."""
    router = APIRouter()

    @router.get("/api/corrections", dependencies=[can_read])
    def list_items(bucket: str = Query(DEFAULT_BUCKET), include_done: bool = Query(False)) -> dict:
        items = _queue(bucket, include_done)
        return {"bucket": bucket, "items": items, "open": sum(i["status"] == "open" for i in items)}

    @router.get("/api/corrections/{item_id}", dependencies=[can_read])
    def get_item(item_id: str, bucket: str = Query(DEFAULT_BUCKET)) -> dict:
        from tasks.feedback.queue import read_item

        try:
            item = read_item(bucket_url(bucket), _item_id(item_id), current_storage_options())
        except FileNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        open_ids = [i["item_id"] for i in _queue(bucket, include_done=False)]
        later = [i for i in open_ids if i != item_id]
        if item_id in open_ids:
            position = open_ids.index(item_id)
            later = open_ids[position + 1:] + open_ids[:position]
        return {**item, "links": _links(item_id, bucket), "next_open": later[0] if later else None, "open": len(open_ids)}

    @router.get("/api/corrections/{item_id}/image", dependencies=[can_read])
    def get_image(item_id: str, bucket: str = Query(DEFAULT_BUCKET)) -> Response:
        return Response(_item_bytes(bucket, item_id, "image"), media_type="image/jpeg", headers=_IMMUTABLE)

    @router.get("/api/corrections/{item_id}/mask", dependencies=[can_read])
    def get_mask(item_id: str, bucket: str = Query(DEFAULT_BUCKET)) -> Response:
        return Response(_item_bytes(bucket, item_id, "mask"), media_type="image/png", headers=_IMMUTABLE)

    @router.get("/api/corrections/{item_id}/final-mask", dependencies=[can_read])
    def get_final_mask(item_id: str, bucket: str = Query(DEFAULT_BUCKET)) -> Response:
        return Response(_item_bytes(bucket, item_id, "final_mask"), media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.get("/api/corrections/{item_id}/thumbnail", dependencies=[can_read])
    def get_thumbnail(item_id: str, bucket: str = Query(DEFAULT_BUCKET)) -> Response:
        from tasks.data.review import thumbnail_jpeg

        data = thumbnail_jpeg(_item_bytes(bucket, item_id, "image"), _item_bytes(bucket, item_id, "mask"), size=200)
        return Response(data, media_type="image/jpeg", headers=_IMMUTABLE)

    @router.post("/api/corrections/{item_id}/decision", dependencies=[can_decide])
    def post_decision(item_id: str, body: DecisionIn, user: GetUserDep, bucket: str = Query(DEFAULT_BUCKET)) -> dict:
        mask_png = None
        if body.mask_png_base64 is not None:
            encoded = body.mask_png_base64.split(",", 1)[1] if body.mask_png_base64.startswith("data:") else body.mask_png_base64
            try:
                mask_png = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(status_code=422, detail="mask_png_base64 is not valid base64") from None
        return _decide(bucket, item_id, user.get_name(), decision=body.decision, mask_png=mask_png,
                       mask_source=body.mask_source, note=body.note)

    @router.post("/api/corrections/{item_id}/upload", dependencies=[can_decide])
    def post_upload(
        item_id: str,
        user: GetUserDep,
        file: UploadFile = File(..., description="the corrected mask: a PNG of the photo's size, white = product"),
        note: str | None = Form(None, max_length=2000),
        bucket: str = Query(DEFAULT_BUCKET),
    ) -> dict:
        data = file.file.read(MAX_MASK_BYTES + 1)
        if len(data) > MAX_MASK_BYTES:
            raise HTTPException(status_code=413, detail=f"mask file larger than {MAX_MASK_BYTES // 2**20} MiB")
        return _decide(bucket, item_id, user.get_name(), decision="corrected", mask_png=data, mask_source="upload", note=note)

    @router.get("/corrections", response_class=HTMLResponse, dependencies=[can_read])
    def queue_page(user: GetUserDep, bucket: str = Query(DEFAULT_BUCKET), show: str = Query("open")) -> str:
        include_done = show == "all"
        items = _queue(bucket, include_done)
        return render_queue_page(items, bucket, user.get_name(), include_done)

    @router.get("/corrections/{item_id}", response_class=HTMLResponse, dependencies=[can_read])
    def item_page(item_id: str, user: GetUserDep, bucket: str = Query(DEFAULT_BUCKET)) -> str:
        bucket_url(bucket)
        return (
            EDITOR_PAGE.replace("{{ITEM}}", html.escape(_item_id(item_id)))
            .replace("{{BUCKET}}", html.escape(bucket))
            .replace("{{USER}}", html.escape(user.get_name()))
        )

    return router


def render_queue_page(items: list[dict], bucket: str, user: str, include_done: bool) -> str:
    """The queue page's HTML: one card per item linking to its editor."""
    e = html.escape
    cards = []
    for item in items:
        status = item["status"]
        who = f" by {e(item['decision']['user'])}" if item.get("decision") else ""
        cards.append(
            f'<a class="card {e(status)}" href="{e(item["links"]["page"])}" data-item="{e(item["item_id"])}">'
            f'<img src="{e(item["links"]["thumbnail"])}" alt="{e(item["stem"])}" loading="lazy">'
            f'<div class="stem" title="{e(item["stem"])}">{e(item["stem"])}</div>'
            f'<div class="meta">batch {e(item["batch"])}</div>'
            f'<div class="meta">score <b>{item["score"]:.3f}</b> (threshold {item["threshold"]:.2f})</div>'
            f'<div class="badge">{e(status)}{who}</div></a>'
        )
    n_open = sum(i["status"] == "open" for i in items)
    toggle = (
        f'<a href="corrections?bucket={e(bucket)}">show open items only</a>'
        if include_done else f'<a href="corrections?bucket={e(bucket)}&amp;show=all">show decided items too</a>'
    )
    empty = "<p class='empty'>Nothing to correct: the queue is empty.</p>" if not items else ""
    return (
        QUEUE_PAGE.replace("{{BUCKET}}", e(bucket)).replace("{{USER}}", e(user))
        .replace("{{COUNT}}", f"{n_open} open" + (f" · {len(items) - n_open} decided" if include_done else ""))
        .replace("{{TOGGLE}}", toggle).replace("{{CARDS}}", "".join(cards) + empty)
    )


_STYLE = """
 body { font-family: system-ui, sans-serif; margin: 0; background: #f5f6f8; color: #1d2433; }
 header { background: #017cee; color: white; padding: 12px 20px; display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }
 header h1 { font-size: 18px; margin: 0; } header span { opacity: .9; font-size: 14px; }
 header a { color: white; }
 #status { margin-left: auto; font-weight: 600; }
 main { padding: 16px 20px; }
 .help { font-size: 14px; color: #4a5568; margin: 0 0 12px; max-width: 70em; }
"""

QUEUE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Correct masks · {{BUCKET}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>""" + _STYLE + """
 .grid { display: flex; flex-wrap: wrap; gap: 12px; }
 .card { width: 200px; background: white; border-radius: 8px; padding: 6px; box-shadow: 0 1px 2px #0002; color: inherit;
         text-decoration: none; font-size: 13px; border: 2px solid transparent; }
 .card:hover { border-color: #017cee; }
 .card img { width: 200px; height: 200px; object-fit: contain; background: #eee; display: block; border-radius: 4px; }
 .card .stem { font-weight: 600; margin: 4px 0 2px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
 .card .meta { color: #4a5568; }
 .badge { display: inline-block; margin-top: 4px; padding: 1px 8px; border-radius: 10px; background: #fff4e6; color: #a14a00; }
 .accepted .badge { background: #e6f7ec; color: #1e7a3c; } .corrected .badge { background: #e7f0ff; color: #1d4ed8; }
 .rejected .badge { background: #fdecec; color: #b42318; }
 .empty { font-size: 16px; }
</style></head>
<body>
<header><h1>bgremoval · correct masks</h1><span>bucket {{BUCKET}} · signed in as {{USER}}</span>
<span id="status" role="status">{{COUNT}}</span></header>
<main>
<p class="help">Photos whose predicted mask scored below the publishing threshold, oldest first. Open one to
<b>accept</b> the prediction, <b>correct</b> it with the brush or a mask file, or <b>reject</b> the photo.
Accepted and corrected masks go into the retraining pool with your name. {{TOGGLE}}</p>
<div class="grid" id="queue">{{CARDS}}</div>
</main></body></html>
"""

EDITOR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Correct mask · {{ITEM}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>""" + _STYLE + """
 main { display: flex; gap: 20px; align-items: flex-start; }
 #stage { flex: 1; min-width: 0; display: flex; justify-content: center; background: #2d3240; border-radius: 8px; padding: 10px;
          background-image: linear-gradient(45deg,#3a4050 25%,transparent 25%,transparent 75%,#3a4050 75%),
                            linear-gradient(45deg,#3a4050 25%,transparent 25%,transparent 75%,#3a4050 75%);
          background-size: 20px 20px; background-position: 0 0, 10px 10px; }
 #editor { max-width: 100%; max-height: calc(100vh - 120px); touch-action: none; cursor: crosshair; display: block; }
 aside { width: 300px; flex: none; display: flex; flex-direction: column; gap: 12px; }
 .panel { background: white; border-radius: 8px; padding: 10px 12px; box-shadow: 0 1px 2px #0002; font-size: 14px; }
 .panel h2 { font-size: 14px; margin: 0 0 8px; text-transform: uppercase; letter-spacing: .04em; color: #4a5568; }
 dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; margin: 0; } dt { color: #4a5568; } dd { margin: 0; overflow-wrap: anywhere; }
 .row { display: flex; gap: 6px; align-items: center; margin: 6px 0; }
 .row > label[for] { flex: none; width: 90px; } .row input[type=range] { flex: 1; }
 button { cursor: pointer; font-size: 14px; padding: 6px 10px; border-radius: 6px; border: 1px solid #c3c9d2; background: #f8f9fb; }
 button:disabled { cursor: not-allowed; opacity: .45; }
 .mode button[aria-pressed=true] { background: #017cee; color: white; border-color: #017cee; }
 .mode button { flex: 1; }
 .decide button { width: 100%; margin: 4px 0; padding: 10px; font-size: 15px; font-weight: 600; color: white; border: none; }
 #accept { background: #1e7a3c; } #save { background: #017cee; } #reject { background: #b42318; }
 #reject.confirm { background: #7a1710; }
 textarea { width: 100%; box-sizing: border-box; font: inherit; }
 #decided { display: none; background: #e6f7ec; border-left: 4px solid #1e7a3c; }
 #decided.rejected { background: #fdecec; border-color: #b42318; }
 nav { display: flex; justify-content: space-between; gap: 8px; font-size: 14px; }
 nav a { color: #017cee; font-weight: 600; }
 .hint { color: #4a5568; font-size: 12px; margin: 4px 0 0; }
</style></head>
<body data-item="{{ITEM}}" data-bucket="{{BUCKET}}">
<header><h1>bgremoval · correct mask</h1><span id="title">{{ITEM}}</span><span>bucket {{BUCKET}} · signed in as {{USER}}</span>
<span id="status" role="status">loading…</span></header>
<main>
<div id="stage"><canvas id="editor" aria-label="photo with the mask overlay; paint to change the mask" width="10" height="10"></canvas></div>
<aside>
 <nav><a id="back" href="#">← Queue</a><a id="next" href="#" hidden>Next open item →</a></nav>
 <section class="panel" id="decided" role="note"></section>
 <section class="panel"><h2>Photo</h2><dl id="info"></dl></section>
 <section class="panel" id="tools"><h2>Brush</h2>
  <div class="row mode" role="group" aria-label="brush mode">
   <button id="mode-add" type="button" aria-pressed="true">Add to mask</button>
   <button id="mode-erase" type="button" aria-pressed="false">Erase</button></div>
  <div class="row"><label for="size">Brush size</label><input id="size" type="range" min="4" max="200" value="40"><span id="size-value">40</span></div>
  <div class="row"><label for="opacity">Overlay</label><input id="opacity" type="range" min="10" max="90" value="50"></div>
  <div class="row"><label><input id="show" type="checkbox" checked> Show mask</label></div>
  <div class="row"><button id="undo" type="button" disabled>↶ Undo</button><button id="reset" type="button" disabled>Reset to prediction</button></div>
  <h2 style="margin-top:12px">Or upload a mask</h2>
  <input id="upload" type="file" accept="image/png,image/*" aria-label="Upload a mask file">
  <p class="hint">A PNG of the photo's size: white = product, black = background (or a transparent cut-out).
  It replaces the mask above; touch it up with the brush, then save.</p>
 </section>
 <section class="panel decide" id="actions"><h2>Decision</h2>
  <label for="note">Note (optional)</label><textarea id="note" rows="2" maxlength="2000"></textarea>
  <button id="accept" type="button" disabled title="the predicted mask is right">Accept prediction</button>
  <button id="save" type="button" disabled title="save the mask as you edited it">Save correction</button>
  <button id="reject" type="button" disabled title="the photo is unusable: it stays out of training">Reject photo</button>
 </section>
</aside>
</main>
<script>
const itemId = document.body.dataset.item, bucket = document.body.dataset.bucket;
const base = new URL("../", window.location.href);
const api = (path) => new URL(path, base).toString();
const $ = (id) => document.getElementById(id);
const status = $("status"), canvas = $("editor"), ctx = canvas.getContext("2d");
const OVERLAY = [255, 0, 170];
const maskCanvas = document.createElement("canvas"), mctx = maskCanvas.getContext("2d", {willReadFrequently: true});
let photo = null, item = null, predicted = null, mode = "add", drawing = false, last = null, cursor = null;
let edited = false, brushed = false, uploaded = false, decided = false, busy = false, rejectArmed = false;
const undoStack = [];
$("back").href = api(`corrections?bucket=${bucket}`);

function setStatus(text) { status.textContent = text; }
function loadImage(url) {
  return new Promise((resolve, reject) => { const img = new Image(); img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load ${url}`)); img.src = url; });
}
function maskFromImage(img, useAlphaIfAny) {
  // Turn a black/white (or transparent) mask image into the overlay: opaque colour = product.
  const tmp = document.createElement("canvas"); tmp.width = img.naturalWidth; tmp.height = img.naturalHeight;
  const t = tmp.getContext("2d", {willReadFrequently: true}); t.drawImage(img, 0, 0);
  const src = t.getImageData(0, 0, tmp.width, tmp.height).data;
  let alphaVaries = false;
  if (useAlphaIfAny) for (let i = 3; i < src.length; i += 4) if (src[i] < 255) { alphaVaries = true; break; }
  const out = mctx.createImageData(tmp.width, tmp.height), d = out.data;
  for (let i = 0; i < src.length; i += 4) {
    const v = alphaVaries ? src[i + 3] : (src[i] * 0.299 + src[i + 1] * 0.587 + src[i + 2] * 0.114);
    if (v >= 128) { d[i] = OVERLAY[0]; d[i + 1] = OVERLAY[1]; d[i + 2] = OVERLAY[2]; d[i + 3] = 255; }
  }
  return out;
}
function render() {
  ctx.globalAlpha = 1; ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (photo) ctx.drawImage(photo, 0, 0);
  if ($("show").checked) { ctx.globalAlpha = $("opacity").value / 100; ctx.drawImage(maskCanvas, 0, 0); ctx.globalAlpha = 1; }
  if (cursor && !decided) {
    ctx.beginPath(); ctx.arc(cursor.x, cursor.y, brushRadius(), 0, 2 * Math.PI);
    ctx.lineWidth = Math.max(1, 2 * scale()); ctx.strokeStyle = mode === "add" ? "#00e5ff" : "#ffdd00"; ctx.stroke();
  }
}
function scale() { const r = canvas.getBoundingClientRect(); return r.width ? canvas.width / r.width : 1; }
function brushRadius() { return Number($("size").value) * scale() / 2; }
function position(e) { const r = canvas.getBoundingClientRect(); const s = scale();
  return {x: (e.clientX - r.left) * s, y: (e.clientY - r.top) * s}; }
function stroke(a, b) {
  mctx.save(); mctx.globalCompositeOperation = mode === "add" ? "source-over" : "destination-out";
  mctx.strokeStyle = mctx.fillStyle = `rgb(${OVERLAY.join(",")})`; mctx.lineWidth = brushRadius() * 2; mctx.lineCap = "round"; mctx.lineJoin = "round";
  mctx.beginPath(); mctx.moveTo(a.x, a.y); mctx.lineTo(b.x + 0.01, b.y); mctx.stroke(); mctx.restore();
}
function pushUndo() { undoStack.push(mctx.getImageData(0, 0, maskCanvas.width, maskCanvas.height)); if (undoStack.length > 15) undoStack.shift(); }
function markEdited(how) {
  edited = true; if (how === "brush") brushed = true; if (how === "upload") { uploaded = true; brushed = false; }
  updateButtons(); setStatus(how === "upload" ? "mask file loaded: check it, then Save correction" : "edited: Save correction when the mask is right");
}
function updateButtons() {
  const locked = decided || busy;
  $("accept").disabled = locked || edited; $("save").disabled = locked || !edited; $("reject").disabled = locked;
  $("undo").disabled = locked || undoStack.length === 0; $("reset").disabled = locked || !edited;
  for (const id of ["mode-add", "mode-erase", "size", "opacity", "upload", "note"]) $(id).disabled = decided;
}
function setMode(m) { mode = m; $("mode-add").setAttribute("aria-pressed", m === "add"); $("mode-erase").setAttribute("aria-pressed", m === "erase"); render(); }

canvas.addEventListener("pointerdown", (e) => {
  if (decided || busy || !photo) return;
  canvas.setPointerCapture(e.pointerId); pushUndo(); drawing = true; last = position(e); stroke(last, last); cursor = last; render();
});
canvas.addEventListener("pointermove", (e) => {
  cursor = position(e); if (drawing) { stroke(last, cursor); last = cursor; } render();
});
const endStroke = () => { if (drawing) { drawing = false; markEdited("brush"); } };
canvas.addEventListener("pointerup", endStroke); canvas.addEventListener("pointercancel", endStroke);
canvas.addEventListener("pointerleave", () => { cursor = null; render(); });
$("mode-add").onclick = () => setMode("add"); $("mode-erase").onclick = () => setMode("erase");
$("size").oninput = () => { $("size-value").textContent = $("size").value; render(); };
$("opacity").oninput = render; $("show").onchange = render;
$("undo").onclick = () => { const prev = undoStack.pop(); if (prev) { mctx.putImageData(prev, 0, 0);
  if (undoStack.length === 0) { edited = brushed = uploaded = false; setStatus("back to the prediction"); } render(); updateButtons(); } };
$("reset").onclick = () => { mctx.clearRect(0, 0, maskCanvas.width, maskCanvas.height); mctx.putImageData(predicted, 0, 0);
  edited = brushed = uploaded = false; undoStack.length = 0; render(); updateButtons(); setStatus("back to the prediction"); };
$("upload").onchange = async () => {
  const file = $("upload").files[0]; if (!file) return;
  const url = URL.createObjectURL(file);
  try {
    const img = await loadImage(url);
    if (img.naturalWidth !== maskCanvas.width || img.naturalHeight !== maskCanvas.height) {
      setStatus(`not used: the file is ${img.naturalWidth}×${img.naturalHeight}, the photo ${maskCanvas.width}×${maskCanvas.height}`); return; }
    pushUndo(); mctx.clearRect(0, 0, maskCanvas.width, maskCanvas.height); mctx.putImageData(maskFromImage(img, true), 0, 0);
    markEdited("upload"); render();
  } catch (err) { setStatus(`not used: ${err.message}`); } finally { URL.revokeObjectURL(url); $("upload").value = ""; }
};

function maskPngBase64() {
  const white = document.createElement("canvas"); white.width = maskCanvas.width; white.height = maskCanvas.height;
  const w = white.getContext("2d"); w.drawImage(maskCanvas, 0, 0); w.globalCompositeOperation = "source-in";
  w.fillStyle = "#fff"; w.fillRect(0, 0, white.width, white.height);
  const out = document.createElement("canvas"); out.width = white.width; out.height = white.height;
  const o = out.getContext("2d"); o.fillStyle = "#000"; o.fillRect(0, 0, out.width, out.height); o.drawImage(white, 0, 0);
  return out.toDataURL("image/png").split(",", 2)[1];
}
async function send(body) {
  busy = true; updateButtons(); setStatus("saving…");
  const note = $("note").value.trim(); if (note) body.note = note;
  try {
    const r = await fetch(api(`api/corrections/${itemId}/decision?bucket=${bucket}`), {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const data = await r.json().catch(() => ({detail: r.statusText}));
    if (!r.ok) { setStatus(`not saved: ${typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)}`); if (r.status === 409) await load(); return; }
    showDecision(data); setStatus(`saved ✓ ${data.decision}`);
  } catch (err) { setStatus(`not saved: ${err.message}`); } finally { busy = false; updateButtons(); }
}
$("accept").onclick = () => send({decision: "accepted"});
$("save").onclick = () => send({decision: "corrected", mask_png_base64: maskPngBase64(), mask_source: brushed || !uploaded ? "brush" : "upload"});
$("reject").onclick = () => {
  if (!rejectArmed) { rejectArmed = true; $("reject").classList.add("confirm"); $("reject").textContent = "Click again to reject";
    setTimeout(() => { rejectArmed = false; $("reject").classList.remove("confirm"); $("reject").textContent = "Reject photo"; }, 4000); return; }
  rejectArmed = false; send({decision: "rejected"});
};

function showDecision(d) {
  decided = true; const box = $("decided"); box.style.display = "block"; box.className = `panel ${d.decision}`;
  box.textContent = `${d.decision[0].toUpperCase()}${d.decision.slice(1)} by ${d.user} at ${d.at.replace("T", " ").slice(0, 19)} UTC` +
    (d.mask_source ? ` · mask: ${d.mask_source}` : "") + (d.note ? ` · “${d.note}”` : "");
  canvas.style.cursor = "default"; cursor = null; render(); updateButtons();
  if (item && item.next_open && item.next_open !== itemId) $("next").hidden = false;
}
async function load() {
  const r = await fetch(api(`api/corrections/${itemId}?bucket=${bucket}`), {credentials: "same-origin"});
  if (!r.ok) { const d = await r.json().catch(() => ({})); setStatus(`error ${r.status}: ${d.detail || ""}`); return; }
  item = await r.json();
  $("title").textContent = `${item.stem} · batch ${item.batch}`;
  const rows = [["stem", item.stem], ["batch", item.batch], ["score", `${item.score.toFixed(3)} (threshold ${item.threshold.toFixed(2)})`],
    ["model", item.model_version ? `version ${item.model_version}` : item.model_uri || "–"], ["size", `${item.width}×${item.height}`],
    ["queued", item.created_at.replace("T", " ").slice(0, 19)]];
  $("info").replaceChildren(...rows.flatMap(([k, v]) => { const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v; return [dt, dd]; }));
  if (item.next_open) $("next").href = api(`corrections/${item.next_open}?bucket=${bucket}`);
  $("next").hidden = !item.next_open || item.status === "open";
  photo = await loadImage(api(item.links.image));
  canvas.width = maskCanvas.width = photo.naturalWidth; canvas.height = maskCanvas.height = photo.naturalHeight;
  predicted = maskFromImage(await loadImage(api(item.links.mask)), false);
  mctx.putImageData(predicted, 0, 0);
  if (item.decision) {
    if (item.decision.decision !== "rejected") mctx.putImageData(maskFromImage(await loadImage(api(item.links.final_mask) + `&t=${Date.now()}`), false), 0, 0);
    showDecision(item.decision); setStatus(`already ${item.decision.decision}`);
  } else { setStatus("ready: accept, paint to correct, or reject"); }
  render(); updateButtons();
}
load().catch((err) => setStatus(`error: ${err.message}`));
</script></body></html>
"""
