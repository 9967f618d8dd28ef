"""The cluster review page: reviewers look at the proposed product clusters, move images, rename clusters.

Reading needs read access to the training DAG, saving a correction needs the right to answer its
human-in-the-loop tasks. Every change is one object under
``datasets/<version>/review/<clustering>/corrections/`` through :mod:`tasks.data.review`, with who and when. Pages are rendered from
``templates/dataset_index.html`` and ``templates/cluster_review.html``.

Routes (all below ``/bgremoval``):

* ``GET  /?bucket=B``                                        the dataset versions, with where each review stands
* ``GET  /review/{version}?bucket=B``                        the page
* ``GET  /api/datasets/{version}/clusters?bucket=B``         clusters, names, members, corrections
* ``GET  /api/datasets/{version}/thumbnails/{key}?bucket=B`` JPEG thumbnail with the mask outline
* ``POST /api/datasets/{version}/corrections?bucket=B``      ``{"action": "move", "key", "to_cluster"}``
  or ``{"action": "rename", "cluster", "name"}``
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from airflow.api_fastapi.core_api.security import GetUserDep
from bgremoval_airflow.web.common import (
    DATASET_VERSION,
    bucket_url,
    can_read_training,
    can_review_training,
    check_key,
    current_storage_options,
    dataset_url,
    default_bucket,
    load_review_state,
    page_count,
    render_page,
    review_errors,
)
from tasks.core import layout, storage


class CorrectionIn(BaseModel):
    """A reviewer's action as posted by the page."""

    action: Literal["move", "rename"]
    key: str | None = Field(default=None, max_length=200)
    to_cluster: int | None = None
    cluster: int | None = None
    name: str | None = Field(default=None, max_length=60)


def state_json(state, version: str, bucket: str) -> dict:
    """The clusters of a review state as the page shows them (thumbnail links relative to ``/bgremoval/``),
    the latest corrections and how many masks the audit flagged."""
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
        "conflicts": [{**{k: v for k, v in vars(c).items() if v is not None}, "reason": reason}
                      for c, reason in state.conflicts[-20:]],
        "masks_flagged": len(state.flagged),
        "masks_undecided": len(state.flagged) - len(state.mask_decisions),
        "closed": state.closed,
        "rejected": state.rejected,
    }


#: Dataset versions on one page of the start page.
INDEX_PAGE_SIZE = 50


def cluster_router() -> APIRouter:
    """The start page, the cluster review page and its API (paths below ``/bgremoval``)."""
    router = APIRouter()
    bucket_default = default_bucket()

    @router.get("/", response_class=HTMLResponse, dependencies=[can_read_training])
    def index(bucket: str = Query(bucket_default), page: int = Query(1, ge=1)) -> str:
        """The start page: the bucket's dataset versions, :data:`INDEX_PAGE_SIZE` per page, each
        linking to its review page once clusters are proposed, with where its review stands
        (:func:`tasks.data.review.review_status`: one listing of ``datasets/``, then a few reads
        per version on the page)."""
        from tasks.data.review import review_status

        root = storage.join(bucket_url(bucket), layout.DATASETS)
        options = current_storage_options()
        names = [v for v in storage.list_folders(root, options) if DATASET_VERSION.match(v)]
        pages = page_count(len(names), INDEX_PAGE_SIZE)
        shown = names[(page - 1) * INDEX_PAGE_SIZE:page * INDEX_PAGE_SIZE]
        versions = [{"name": v, "status": review_status(storage.join(root, v), options)} for v in shown]
        return render_page("dataset_index.html", bucket=bucket, versions=versions, page=page, pages=pages,
                           total=len(names))

    @router.get("/api/datasets/{version}/clusters", dependencies=[can_read_training])
    def get_clusters(version: str, bucket: str = Query(bucket_default)) -> dict:
        """The clusters of a dataset version with their names, members and the latest corrections."""
        return state_json(load_review_state(version, bucket), version, bucket)

    @router.get("/api/datasets/{version}/thumbnails/{key}", dependencies=[can_read_training])
    def get_thumbnail(version: str, key: str, bucket: str = Query(bucket_default)) -> Response:
        """A clean pair's JPEG thumbnail with the mask outline."""
        from tasks.data.ingest import clean_urls
        from tasks.data.review import thumbnail_jpeg

        check_key(key)
        image_url, mask_url = clean_urls(dataset_url(version, bucket), key)
        options = current_storage_options()
        try:
            data = thumbnail_jpeg(storage.read_bytes(image_url, options), storage.read_bytes(mask_url, options))
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail=f"no clean pair {key!r}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.post("/api/datasets/{version}/corrections", dependencies=[can_review_training])
    def post_correction(version: str, body: CorrectionIn, user: GetUserDep, bucket: str = Query(bucket_default)) -> dict:
        """Save a move or a rename (who and when) and answer the updated clusters."""
        from tasks.data.review import record_correction

        fields = {k: v for k, v in body.model_dump().items() if k != "action" and v is not None}
        with review_errors():
            state = record_correction(
                dataset_url(version, bucket), body.action, user.get_name(), current_storage_options(), **fields
            )
        return state_json(state, version, bucket)

    @router.get("/review/{version}", response_class=HTMLResponse, dependencies=[can_read_training])
    def review_page(version: str, user: GetUserDep, bucket: str = Query(bucket_default)) -> str:
        """The cluster review page (the script loads the clusters from the API)."""
        dataset_url(version, bucket)
        return render_page("cluster_review.html", version=version, bucket=bucket, user=user.get_name())

    return router
