"""Studio drops that are ready for production: ``incoming/<batch>/_READY`` markers, and which of
them already have their ``bgremoval_inference`` run.

The drop-discovery DAG lists the batch folders under ``incoming/`` (one delimited listing, not
every photo), keeps those with a ``_READY`` marker and without ``production/<batch>/_STARTED``, and
starts one inference run per batch with the run id :func:`drop_run_id`, which Airflow refuses to
create twice. The marker records when ``_READY`` was written: a studio that drops the batch again
(new photos, ``_READY`` written anew) gets one more run, with the run id of that ``_READY``, and the
photos whose content changed are processed again (:func:`tasks.feedback.queue.photo_id`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime, timezone

from tasks.core import layout, storage

log = logging.getLogger(__name__)

__all__ = ["claim_drop", "drop_run_id", "mark_started", "new_drops", "ready_written_at"]


def drop_run_id(batch: str, ready: str | None = None) -> str:
    """The ``bgremoval_inference`` run id of a drop: ``drop__<batch>`` for its first drop, and
    ``drop__<batch>__<8 hex>`` for a later one, from when its ``_READY`` was written; the same drop
    always gets the same id."""
    if ready is None:
        return f"drop__{batch}"
    return f"drop__{batch}__{hashlib.sha1(ready.encode()).hexdigest()[:8]}"


def ready_written_at(bucket_url: str, batch: str, storage_options: dict | None = None) -> str:
    """When ``incoming/<batch>/_READY`` was last written, as the store says (S3 ``LastModified``, a
    local file's mtime)."""
    fs, path = storage.filesystem(layout.ready_marker(layout.incoming(bucket_url, batch)), storage_options)
    fs.invalidate_cache(path)
    info = fs.info(path)
    return str(info.get("LastModified") or info.get("mtime") or "")


def new_drops(bucket_url: str, storage_options: dict | None = None) -> list[dict[str, str]]:
    """The drops to start, sorted by batch: ``{"batch", "run_id", "ready"}`` for each batch under
    ``incoming/`` with a ``_READY`` marker and either no ``_STARTED`` marker (its first drop) or one
    recorded for an earlier ``_READY`` (dropped again); a folder whose name is no batch name
    (:data:`tasks.core.layout.BATCH_NAME_PATTERN`, e.g. ``Shoot 12``) is left out with a warning
    instead of failing every poll on its run id. ``ready`` is when the ``_READY`` this drop is
    for was written: hand it to :func:`mark_started`, so that a ``_READY`` written again after this
    listing is a drop of its own."""
    found = []
    for batch in storage.list_folders(storage.join(bucket_url, layout.INCOMING), storage_options):
        if not re.fullmatch(layout.BATCH_NAME_PATTERN, batch):
            log.warning("incoming/%s/: left alone, not a batch name (letters, digits, '.', '_' and '-', starting "
                        "with a letter or digit): copy its photos under a folder so named", batch)
            continue
        try:
            ready = ready_written_at(bucket_url, batch, storage_options)
        except FileNotFoundError:
            continue  # still being copied
        marked = _marked_ready(bucket_url, batch, storage_options)
        if marked is None:
            found.append({"batch": batch, "run_id": drop_run_id(batch), "ready": ready})
        elif marked and marked != ready:  # markers written before this field was kept count as current
            found.append({"batch": batch, "run_id": drop_run_id(batch, ready), "ready": ready})
    return found


def _marked_ready(bucket_url: str, batch: str, storage_options: dict | None) -> str | None:
    """The ``_READY`` time the batch's ``_STARTED`` marker was written for: None without a marker,
    "" for a marker from before that field was kept."""
    started_url = layout.drop_started(bucket_url, batch)
    if not storage.exists(started_url, storage_options):
        return None
    return json.loads(storage.read_bytes(started_url, storage_options)).get("ready") or ""


def mark_started(bucket_url: str, batch: str, run_id: str, ready: str,
                 storage_options: dict | None = None) -> str:
    """Record that ``batch``'s inference run ``run_id`` exists and which ``_READY`` it is for (``ready``,
    as :func:`new_drops` found it, not read again); returns the marker's URL."""
    url = layout.drop_started(bucket_url, batch)
    body = {"batch": batch, "run_id": run_id, "ready": ready,
            "marked_at": datetime.now(timezone.utc).isoformat()}
    storage.write_text(url, json.dumps(body), storage_options)
    return url


def claim_drop(bucket_url: str, batch: str, run_id: str, storage_options: dict | None = None) -> bool:
    """Record that the inference run ``run_id`` handles ``batch``'s current drop, unless a run already
    does (its ``_STARTED`` names the same ``_READY``): a run started by hand marks the drop as the
    drops DAG's runs are marked, so that the drops DAG does not start another for it. Returns whether
    this call wrote the marker (False also for a drop without ``_READY``: nothing to claim)."""
    try:
        ready = ready_written_at(bucket_url, batch, storage_options)
    except FileNotFoundError:
        return False
    marked = _marked_ready(bucket_url, batch, storage_options)
    if marked is not None and marked in ("", ready):
        return False
    mark_started(bucket_url, batch, run_id, ready, storage_options)
    return True
