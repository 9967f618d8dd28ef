"""Studio drops that are ready for production: ``incoming/<batch>/_READY`` markers, and which of
them already have their ``bgremoval_inference`` run.

The drop-discovery DAG lists the batch folders under ``incoming/`` (one delimited listing, not
every photo), keeps those with a ``_READY`` marker and without ``production/<batch>/_STARTED``, and
starts one inference run per batch with the run id :func:`drop_run_id`, which Airflow refuses to
create twice. The marker only saves later polls from looking at old drops again.
"""

from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone

from tasks.core import layout, storage

__all__ = ["drop_run_id", "mark_started", "new_drops"]


def drop_run_id(batch: str) -> str:
    """The ``bgremoval_inference`` run id of a drop: the same batch always gets the same id."""
    return f"drop__{batch}"


def _batch_folders(bucket_url: str, storage_options: dict | None) -> list[str]:
    fs, path = storage.filesystem(storage.join(bucket_url, layout.INCOMING), storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")


def new_drops(bucket_url: str, storage_options: dict | None = None) -> list[str]:
    """The batches under ``incoming/`` with a ``_READY`` marker and no ``_STARTED`` marker, sorted."""
    ready = []
    for batch in _batch_folders(bucket_url, storage_options):
        incoming = layout.incoming(bucket_url, batch)
        if (storage.exists(layout.ready_marker(incoming), storage_options)
                and not storage.exists(layout.drop_started(bucket_url, batch), storage_options)):
            ready.append(batch)
    return ready


def mark_started(bucket_url: str, batch: str, run_id: str, storage_options: dict | None = None) -> str:
    """Record that ``batch``'s inference run ``run_id`` exists; returns the marker's URL."""
    url = layout.drop_started(bucket_url, batch)
    body = {"batch": batch, "run_id": run_id, "marked_at": datetime.now(timezone.utc).isoformat()}
    storage.write_text(url, json.dumps(body), storage_options)
    return url
