"""Publishing the photos a person decided on the correction page.

The inference DAG publishes a confident cut-out at once and queues a doubtful one. Once a person
accepts the predicted mask or corrects it, the photo is cut out again from the original photo with
that mask, the way its run would have published it (the item's ``outputs``: background, canvas,
margin), into the same ``published/<batch>/`` folder, and
``corrections/done/<item_id>/published.json`` records the files. Rejected items are not published.

:func:`publish_decision` runs right after a decision (the correction page's API); the inference
DAG's last task runs :func:`publish_decisions`, which catches up on any decision whose publishing
failed or was interrupted. Both are idempotent: a published item is not written again.
"""

from __future__ import annotations

import hashlib
import json
import logging

import cv2
import numpy as np

from tasks.core import layout, storage
from tasks.feedback.config import PUBLISHED_DECISIONS
from tasks.feedback.queue import done_url, list_queue, now_iso, read_item
from tasks.serving.pipeline import InferenceConfig, cutout_with_mask, write_outputs

log = logging.getLogger(__name__)



def published_marker(bucket_url: str, item_id: str) -> str:
    """``corrections/done/<item_id>/published.json``: the record that a decided photo was published."""
    return storage.join(done_url(bucket_url, item_id), "published.json")


def publish_decision(bucket_url: str, item_id: str, storage_options: dict | None = None) -> dict | None:
    """Publish one decided item's cut-out; returns the ``published.json`` record (the earlier one
    when it was published already), or None when the item is open or rejected.

    Raises ``FileNotFoundError`` for an unknown item or a vanished original photo and
    ``ValueError`` when the photo cannot be cut out, or was replaced since it was queued (its bytes
    differ from the item's ``source_sha256``); nothing is recorded then, so a later call tries again.
    """
    item = read_item(bucket_url, item_id, storage_options)
    record = _publish(bucket_url, item, storage_options)
    if record is None and _publishable(item):  # published before: its record
        return json.loads(storage.read_bytes(published_marker(bucket_url, item_id), storage_options))
    return record


def _publishable(item: dict) -> bool:
    return item["decision"] is not None and item["decision"]["decision"] in PUBLISHED_DECISIONS


def _publish(bucket_url: str, item: dict, storage_options: dict | None) -> dict | None:
    """Publish an item already read (``item.json`` fields and ``decision``); returns the new
    ``published.json`` record, or None when there is nothing to publish (open, rejected, or
    published before)."""
    item_id, decision = item["item_id"], item["decision"]
    marker = published_marker(bucket_url, item_id)
    if not _publishable(item) or storage.exists(marker, storage_options):
        return None
    mask_png = storage.read_bytes(storage.join(done_url(bucket_url, item_id), "mask.png"), storage_options)
    mask = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"the decided mask of {item_id} does not decode")
    outputs = item.get("outputs") or {}
    config = InferenceConfig(background=outputs.get("background") or "#ffffff", canvas=outputs.get("canvas"),
                             margin=float(outputs.get("margin", 0.05)), mask=True, refine=None)
    photo = storage.read_bytes(item["source_url"], storage_options)
    if item.get("source_sha256") and hashlib.sha256(photo).hexdigest() != item["source_sha256"]:
        raise ValueError(f"{item_id}: the photo at {item['source_url']} changed since it was queued (a later drop "
                         "replaced it; that drop has its own outputs): the decided mask is not for it")
    result = cutout_with_mask(item["stem"], item["source_url"], photo, mask, config)
    if not result.ok:
        raise ValueError(f"{item_id}: {result.error}")
    files = write_outputs(result, layout.published(bucket_url, item["batch"]), storage_options)
    record = {"item_id": item_id, "decision": decision["decision"], "user": decision["user"], "at": now_iso(),
              "files": files}
    storage.write_bytes(marker, json.dumps(record, indent=2).encode(), storage_options)
    log.info("published %s (%s by %s): %s", item_id, decision["decision"], decision["user"], sorted(files))
    return record


def publish_decisions(bucket_url: str, storage_options: dict | None = None) -> dict:
    """Publish every accepted or corrected item not published yet; one that fails is reported and
    left for the next call. Returns ``{"published": [item ids], "failed": {item id: reason}}``."""
    published: list[str] = []
    failed: dict[str, str] = {}
    for entry in list_queue(bucket_url, storage_options, include_done=True):
        item_id = entry["item_id"]
        try:
            record = _publish(bucket_url, entry, storage_options)
        except Exception as exc:  # noqa: BLE001 - this item's photo, mask or record; the others still go out
            failed[item_id] = f"{type(exc).__name__}: {exc}"
            continue
        if record is not None:
            published.append(item_id)
    return {"published": published, "failed": failed}
