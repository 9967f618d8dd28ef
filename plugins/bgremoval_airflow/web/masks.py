"""The "Masks to check" page: reviewers keep, exclude or fix the masks the mask audit flagged.

Reading needs read access to the training DAG, answering needs the right to answer its
human-in-the-loop tasks. Every answer is one object under
``datasets/<version>/review/<clustering>/corrections/`` through :mod:`tasks.data.review` (a fixed mask under
``review/masks/``), with who and when. The page is
rendered from ``templates/mask_review.html``.

Routes (all below ``/bgremoval``):

* ``GET  /review/{version}/masks?bucket=B``                 the page
* ``GET  /api/datasets/{version}/masks?bucket=B``           flagged pairs, reasons, decisions, counts
* ``GET  /api/datasets/{version}/masks/{key}/thumbnail?bucket=B[&fixed=<key>-<id>.png]`` JPEG, mask (or fix) overlaid
* ``POST /api/datasets/{version}/masks/{key}?bucket=B``     ``{"decision": "keep" | "exclude"}``
* ``POST /api/datasets/{version}/masks/{key}/fix?bucket=B`` multipart ``file``: the corrected mask PNG
"""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from airflow.api_fastapi.core_api.security import GetUserDep
from bgremoval_airflow.web.common import (
    can_read_training,
    can_review_training,
    check_key,
    current_storage_options,
    dataset_url,
    default_bucket,
    load_review_state,
    render_page,
    review_errors,
)
from tasks.core import storage
from tasks.data.config import MAX_FIXED_MASK_BYTES


class MaskDecisionIn(BaseModel):
    """A reviewer's answer to a flagged mask (``fix`` goes through the upload endpoint)."""

    decision: Literal["keep", "exclude"]


def masks_json(state, version: str, bucket: str) -> dict:
    """The flagged pairs (with thumbnail links relative to ``/bgremoval/``) and the decision counts."""
    pairs = state.flagged_pairs()
    for pair in pairs:
        thumbnail = f"api/datasets/{version}/masks/{pair['key']}/thumbnail?bucket={bucket}"
        pair["thumbnail"] = thumbnail + (f"&fixed={pair['fixed_file']}" if pair["decision"] == "fix" else "")
    counts = {d: sum(p["decision"] == d for p in pairs) for d in ("keep", "exclude", "fix")}
    return {
        "version": version,
        "bucket": bucket,
        "pairs": pairs,
        "flagged": len(pairs),
        "decided": counts,
        "undecided": len(pairs) - sum(counts.values()),
        "closed": state.closed,
    }


def mask_router() -> APIRouter:
    """The "Masks to check" page and its API (paths below ``/bgremoval``)."""
    router = APIRouter()
    bucket_default = default_bucket()

    @router.get("/api/datasets/{version}/masks", dependencies=[can_read_training])
    def get_masks(version: str, bucket: str = Query(bucket_default)) -> dict:
        """The pairs the mask audit flagged, with their reasons, decisions and the counts."""
        return masks_json(load_review_state(version, bucket), version, bucket)

    @router.get("/api/datasets/{version}/masks/{key}/thumbnail", dependencies=[can_read_training])
    def get_mask_thumbnail(
        version: str, key: str, bucket: str = Query(bucket_default), fixed: str = Query("")
    ) -> Response:
        """A flagged pair's JPEG with its mask (or, with ``fixed``, the upload of that file name) overlaid."""
        from tasks.data.ingest import clean_urls
        from tasks.data.review import fixed_mask_url, thumbnail_jpeg

        check_key(key)
        if fixed and fixed != "true" and not re.fullmatch(rf"{re.escape(key)}-[0-9a-f]{{12}}\.png", fixed):
            raise HTTPException(status_code=400, detail="invalid fixed mask name")  # "true": a fix from before
        url = dataset_url(version, bucket)
        image_url, mask_url = clean_urls(url, key)
        options = current_storage_options()
        try:
            chosen = fixed_mask_url(url, key, None if fixed == "true" else fixed) if fixed else mask_url
            mask = storage.read_bytes(chosen, options)
            data = thumbnail_jpeg(storage.read_bytes(image_url, options), mask, size=240, overlay=True)
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail=f"no {'fixed mask' if fixed else 'clean pair'} {key!r}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store" if fixed else "private, max-age=3600"})

    @router.post("/api/datasets/{version}/masks/{key}", dependencies=[can_review_training])
    def post_mask_decision(
        version: str, key: str, body: MaskDecisionIn, user: GetUserDep, bucket: str = Query(bucket_default)
    ) -> dict:
        """Save keep or exclude for a flagged mask and answer the updated list."""
        from tasks.data.review import record_correction

        check_key(key)
        with review_errors():
            state = record_correction(
                dataset_url(version, bucket), "mask", user.get_name(), current_storage_options(), key=key, decision=body.decision
            )
        return masks_json(state, version, bucket)

    @router.post("/api/datasets/{version}/masks/{key}/fix", dependencies=[can_review_training])
    def post_mask_fix(
        version: str,
        key: str,
        user: GetUserDep,
        file: UploadFile = File(..., description="the corrected mask: a PNG of the clean pair's size, white = product"),
        bucket: str = Query(bucket_default),
    ) -> dict:
        """Save an uploaded corrected mask as the pair's fix and answer the updated list."""
        from tasks.data.review import save_fixed_mask

        check_key(key)
        data = file.file.read(MAX_FIXED_MASK_BYTES + 1)
        if len(data) > MAX_FIXED_MASK_BYTES:
            raise HTTPException(status_code=413, detail=f"mask file larger than {MAX_FIXED_MASK_BYTES // 2**20} MiB")
        with review_errors():
            state = save_fixed_mask(dataset_url(version, bucket), key, data, user.get_name(), current_storage_options())
        return masks_json(state, version, bucket)

    @router.get("/review/{version}/masks", response_class=HTMLResponse, dependencies=[can_read_training])
    def mask_review_page(version: str, user: GetUserDep, bucket: str = Query(bucket_default)) -> str:
        """The "Masks to check" page, one tile per flagged pair."""
        masks = masks_json(load_review_state(version, bucket), version, bucket)
        return render_page("mask_review.html", user=user.get_name(), base="../../", **masks)

    return router
