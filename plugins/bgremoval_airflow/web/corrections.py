"""The correction pages: people accept, reject or correct the masks the inference DAG doubted.

Included in the plugin's app by :func:`bgremoval_airflow.web.app.create_app`, so the routes live
below ``/bgremoval`` with the same login. Reading needs read access to the inference DAG; deciding needs the right to answer its human-in-the-loop tasks (simple auth
manager: role ``user`` or higher; a ``viewer`` can look only). Storage is :mod:`tasks.feedback.queue`.
The pages are rendered from ``templates/correction_queue.html`` and ``templates/correction_editor.html``.

Routes (all below ``/bgremoval``):

* ``GET  /corrections?bucket=B[&show=all][&page=N]``  the queue page (thumbnails, score, batch), 48 per page
* ``GET  /corrections/{item_id}?bucket=B``            the editor: photo + mask overlay, brush, upload
* ``GET  /api/corrections?bucket=B[&include_done=1][&offset=0&limit=100]`` a page of the queue as JSON
* ``GET  /api/corrections/{item_id}?bucket=B``        one item (+ its decision, the next open item)
* ``GET  /api/corrections/{item_id}/image|mask|final-mask|thumbnail?bucket=B[&decided=true]``  JPEG / PNG bytes
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
import logging
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from bgremoval_airflow.web.common import (answer_errors, bucket_url, current_storage_options, default_bucket, page_count,
                                          render_page)
from tasks.core.limits import ASPECT_TOLERANCE
from tasks.feedback.config import MAX_MASK_BYTES, PUBLISHED_DECISIONS

log = logging.getLogger(__name__)

INFERENCE_DAG_ID = "bgremoval_inference"

can_read = Depends(requires_access_dag("GET", param_dag_id=INFERENCE_DAG_ID))
can_decide = Depends(requires_access_dag("PUT", DagAccessEntity.HITL_DETAIL, param_dag_id=INFERENCE_DAG_ID))
_IMMUTABLE = {"Cache-Control": "private, max-age=86400"}


class DecisionIn(BaseModel):
    """A decision as posted by the page (or any HTTP client)."""

    decision: Literal["accepted", "rejected", "corrected"]
    mask_png_base64: str | None = Field(default=None, max_length=4 * MAX_MASK_BYTES // 3 + 64)
    mask_source: Literal["brush", "upload"] | None = None
    note: str | None = Field(default=None, max_length=2000)


def _item_id(item_id: str) -> str:
    """``item_id`` when it is a valid queue item id, else a 400."""
    from tasks.feedback.queue import CorrectionsError, check_id

    try:
        return check_id(item_id)
    except CorrectionsError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


def _decide(bucket: str, item_id: str, user: str, **kwargs) -> dict:
    """Call :func:`tasks.feedback.queue.decide` and turn its errors into HTTP answers; then publish
    an accepted or corrected photo (``published``: its files; ``publish_error`` when that failed:
    the decision stands, and the inference DAG's ``publish_decided`` tries again)."""
    from tasks.feedback.publishing import publish_decision
    from tasks.feedback.queue import AlreadyDecided, CorrectionsError, decide

    url, options = bucket_url(bucket), current_storage_options()
    with answer_errors({AlreadyDecided: 409, CorrectionsError: 422, FileNotFoundError: 404}):
        record = decide(url, _item_id(item_id), user=user, storage_options=options, **kwargs)
    try:
        published = publish_decision(url, record["item_id"], options)
    except Exception as exc:  # noqa: BLE001 - the decision is recorded: say what failed, never a 500
        log.warning("publishing %s after its decision failed: %s", record["item_id"], exc)
        return {**record, "published": None, "publish_error": str(exc)}
    return {**record, "published": published["files"] if published else None}


def _links(item_id: str, bucket: str, status: str) -> dict:
    """Relative URLs (from ``/bgremoval/``) of an item's page and bytes. Once a mask is decided the
    thumbnail link changes (``&decided=true``), so a browser's cached copy of the predicted one is not reused."""
    api = f"api/corrections/{item_id}"
    decided = "&decided=true" if status in PUBLISHED_DECISIONS else ""
    return {
        "page": f"corrections/{item_id}?bucket={bucket}",
        "image": f"{api}/image?bucket={bucket}",
        "mask": f"{api}/mask?bucket={bucket}",
        "final_mask": f"{api}/final-mask?bucket={bucket}",
        "thumbnail": f"{api}/thumbnail?bucket={bucket}{decided}",
    }


#: Items on one queue page (the page reads only these: :func:`tasks.feedback.queue.queue_page`).
PAGE_SIZE = 48


def _page(bucket: str, include_done: bool, offset: int, limit: int):
    """A page of the queue (:func:`tasks.feedback.queue.queue_page`), each item with its :func:`_links`."""
    from tasks.feedback.queue import queue_page

    page = queue_page(bucket_url(bucket), current_storage_options(), include_done, offset, limit)
    return page, [{**item, "links": _links(item["item_id"], bucket, item["status"])} for item in page.items]


def _item_bytes(bucket: str, item_id: str, name: str) -> bytes:
    """One stored file of an item (``image``, ``mask``, ``final_mask``); 404 when it is missing."""
    from tasks.feedback.queue import read_item_file

    try:
        return read_item_file(bucket_url(bucket), _item_id(item_id), name, current_storage_options())
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def correction_router() -> APIRouter:
    """The correction queue and editor pages and their API (paths below ``/bgremoval``)."""
    router = APIRouter()
    bucket_default = default_bucket()

    @router.get("/api/corrections", dependencies=[can_read])
    def list_items(bucket: str = Query(bucket_default), include_done: bool = Query(False),
                   offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=500)) -> dict:
        """A page of the correction queue (open items, or all with ``include_done``), worst first."""
        page, items = _page(bucket, include_done, offset, limit)
        return {"bucket": bucket, "items": items, "open": page.n_open, "total": page.total, "offset": offset,
                "limit": limit}

    @router.get("/api/corrections/{item_id}", dependencies=[can_read])
    def get_item(item_id: str, bucket: str = Query(bucket_default)) -> dict:
        """One item with its decision, its links and the next open item."""
        from tasks.feedback.queue import queue_order, read_item

        try:
            item = read_item(bucket_url(bucket), _item_id(item_id), current_storage_options())
        except FileNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        open_ids = queue_order(bucket_url(bucket), current_storage_options()).selected(include_done=False)
        later = [i for i in open_ids if i != item_id]
        if item_id in open_ids:
            position = open_ids.index(item_id)
            later = open_ids[position + 1:] + open_ids[:position]
        return {**item, "links": _links(item_id, bucket, item["status"]), "next_open": later[0] if later else None, "open": len(open_ids)}

    @router.get("/api/corrections/{item_id}/image", dependencies=[can_read])
    def get_image(item_id: str, bucket: str = Query(bucket_default)) -> Response:
        """The item's photo (JPEG)."""
        return Response(_item_bytes(bucket, item_id, "image"), media_type="image/jpeg", headers=_IMMUTABLE)

    @router.get("/api/corrections/{item_id}/mask", dependencies=[can_read])
    def get_mask(item_id: str, bucket: str = Query(bucket_default)) -> Response:
        """The item's predicted mask (PNG)."""
        return Response(_item_bytes(bucket, item_id, "mask"), media_type="image/png", headers=_IMMUTABLE)

    @router.get("/api/corrections/{item_id}/final-mask", dependencies=[can_read])
    def get_final_mask(item_id: str, bucket: str = Query(bucket_default)) -> Response:
        """The mask the decision kept (PNG; 404 while undecided)."""
        return Response(_item_bytes(bucket, item_id, "final_mask"), media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.get("/api/corrections/{item_id}/thumbnail", dependencies=[can_read])
    def get_thumbnail(item_id: str, bucket: str = Query(bucket_default), decided: bool = Query(False)) -> Response:
        """The photo with the predicted mask (with ``decided``, the mask the decision kept), as a small
        JPEG for the queue page."""
        from tasks.data.review import thumbnail_jpeg

        mask = _item_bytes(bucket, item_id, "final_mask" if decided else "mask")
        data = thumbnail_jpeg(_item_bytes(bucket, item_id, "image"), mask, size=200)
        return Response(data, media_type="image/jpeg", headers=_IMMUTABLE)

    @router.post("/api/corrections/{item_id}/decision", dependencies=[can_decide])
    def post_decision(item_id: str, body: DecisionIn, user: GetUserDep, bucket: str = Query(bucket_default)) -> dict:
        """Accept, reject or correct (mask as base64 PNG) an item."""
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
        bucket: str = Query(bucket_default),
    ) -> dict:
        """Correct an item with an uploaded mask file."""
        data = file.file.read(MAX_MASK_BYTES + 1)
        if len(data) > MAX_MASK_BYTES:
            raise HTTPException(status_code=413, detail=f"mask file larger than {MAX_MASK_BYTES // 2**20} MiB")
        return _decide(bucket, item_id, user.get_name(), decision="corrected", mask_png=data, mask_source="upload", note=note)

    @router.get("/corrections", response_class=HTMLResponse, dependencies=[can_read])
    def queue_page(user: GetUserDep, bucket: str = Query(bucket_default), show: str = Query("open"),
                   page: int = Query(1, ge=1)) -> str:
        """The queue page: one card per item linking to its editor, :data:`PAGE_SIZE` per page."""
        include_done = show == "all"
        listed, items = _page(bucket, include_done, (page - 1) * PAGE_SIZE, PAGE_SIZE)
        pages = page_count(listed.total, PAGE_SIZE)
        return render_page("correction_queue.html", items=items, n_open=listed.n_open, total=listed.total,
                           page=page, pages=pages, include_done=include_done, bucket=bucket, user=user.get_name())

    @router.get("/corrections/{item_id}", response_class=HTMLResponse, dependencies=[can_read])
    def item_page(item_id: str, user: GetUserDep, bucket: str = Query(bucket_default)) -> str:
        """The editor of one item (the script loads the item from the API)."""
        bucket_url(bucket)
        return render_page("correction_editor.html", item_id=_item_id(item_id), bucket=bucket, user=user.get_name(),
                           aspect_tolerance=ASPECT_TOLERANCE)

    return router
