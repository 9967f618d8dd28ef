"""``tasks.feedback.drops``: ready drops without a started marker, on a local folder and on moto S3."""

from __future__ import annotations

import json

from tasks.core import layout, storage
from tasks.feedback.drops import drop_run_id, mark_started, new_drops


def test_ready_drops_are_found_until_marked_started(bucket):
    bucket_url, options = bucket
    assert new_drops(bucket_url, options) == []  # no incoming/ yet
    for batch in ("b-2", "a-1", "c-3"):
        storage.write_bytes(storage.join(layout.incoming(bucket_url, batch), "p.jpg"), b"jpeg", options)
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "a-1")), b"", options)
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "b-2")), b"", options)
    assert new_drops(bucket_url, options) == ["a-1", "b-2"]  # c-3 is still being copied
    url = mark_started(bucket_url, "a-1", drop_run_id("a-1"), options)
    assert json.loads(storage.read_bytes(url, options))["run_id"] == "drop__a-1"
    assert new_drops(bucket_url, options) == ["b-2"]
    assert storage.exists(storage.join(layout.incoming(bucket_url, "a-1"), "p.jpg"), options)  # inputs untouched
