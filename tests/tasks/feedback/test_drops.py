"""``tasks.feedback.drops``: ready drops without a started marker, on a local folder and on moto S3."""

from __future__ import annotations

import json
import time

from tasks.core import layout, storage
from tasks.feedback.drops import drop_run_id, mark_started, new_drops


def test_ready_drops_are_found_until_marked_started(bucket):
    bucket_url, options = bucket
    assert new_drops(bucket_url, options) == []  # no incoming/ yet
    for batch in ("b-2", "a-1", "c-3"):
        storage.write_bytes(storage.join(layout.incoming(bucket_url, batch), "p.jpg"), b"jpeg", options)
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "a-1")), b"", options)
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "b-2")), b"", options)
    drops = new_drops(bucket_url, options)
    assert [(d["batch"], d["run_id"]) for d in drops] == [("a-1", "drop__a-1"), ("b-2", "drop__b-2")]  # c-3: copying
    url = mark_started(bucket_url, "a-1", drop_run_id("a-1"), drops[0]["ready"], options)
    assert json.loads(storage.read_bytes(url, options))["run_id"] == "drop__a-1"
    assert new_drops(bucket_url, options) == [drops[1]]
    assert storage.exists(storage.join(layout.incoming(bucket_url, "a-1"), "p.jpg"), options)  # inputs untouched


def drop(bucket_url: str, options, batch: str, photo: bytes = b"jpeg") -> None:
    """The studio copies a photo into ``incoming/<batch>/`` and writes ``_READY``."""
    storage.write_bytes(storage.join(layout.incoming(bucket_url, batch), "p.jpg"), photo, options)
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, batch)), b"", options)


def test_a_batch_dropped_again_gets_one_more_run(bucket):
    bucket_url, options = bucket
    drop(bucket_url, options, "a-1")
    (first,) = new_drops(bucket_url, options)
    mark_started(bucket_url, "a-1", first["run_id"], first["ready"], options)
    assert new_drops(bucket_url, options) == []
    time.sleep(1.1)  # S3's LastModified has whole seconds
    drop(bucket_url, options, "a-1", b"new jpeg")  # the studio drops the batch again
    (again,) = new_drops(bucket_url, options)
    assert again["batch"] == "a-1" and again["run_id"].startswith("drop__a-1__") and len(again["run_id"]) == 19
    assert new_drops(bucket_url, options) == [again]  # the same drop: the same run id until it is marked
    mark_started(bucket_url, "a-1", again["run_id"], again["ready"], options)
    assert new_drops(bucket_url, options) == []


def test_a_ready_written_again_while_the_drop_starts_is_a_drop_of_its_own(bucket):
    bucket_url, options = bucket
    drop(bucket_url, options, "a-1")
    (first,) = new_drops(bucket_url, options)
    time.sleep(1.1)
    drop(bucket_url, options, "a-1")  # the studio drops again between discovery and the marker
    mark_started(bucket_url, "a-1", first["run_id"], first["ready"], options)
    (again,) = new_drops(bucket_url, options)  # the marker is for the first _READY: the second still runs
    assert again["run_id"] != first["run_id"] and again["ready"] != first["ready"]


def test_a_marker_from_before_the_ready_time_was_kept_counts_as_current(bucket):
    bucket_url, options = bucket
    storage.write_bytes(layout.ready_marker(layout.incoming(bucket_url, "old")), b"", options)
    storage.write_text(layout.drop_started(bucket_url, "old"), json.dumps({"batch": "old", "run_id": "drop__old"}),
                       options)
    assert new_drops(bucket_url, options) == []


def test_a_run_started_by_hand_claims_its_drop_so_that_no_second_run_starts(bucket):
    from tasks.feedback.drops import claim_drop

    bucket_url, options = bucket
    drop(bucket_url, options, "shop-1")
    assert not claim_drop(bucket_url, "nothing-here", "manual__1", options)  # no _READY: nothing to claim
    assert claim_drop(bucket_url, "shop-1", "manual__1", options)
    assert new_drops(bucket_url, options) == []  # the drops DAG leaves it to the hand-started run
    assert not claim_drop(bucket_url, "shop-1", "drop__shop-1", options)  # a second run does not rewrite it
    marker = json.loads(storage.read_bytes(layout.drop_started(bucket_url, "shop-1"), options))
    assert marker["run_id"] == "manual__1"
    time.sleep(1.1)  # a new _READY (the batch dropped again) is a drop of its own
    drop(bucket_url, options, "shop-1", photo=b"other")
    assert [d["batch"] for d in new_drops(bucket_url, options)] == ["shop-1"]


def test_a_folder_whose_name_is_no_batch_name_is_left_out_with_a_warning(bucket, caplog):
    # "Shoot 12" would be the run id drop__Shoot 12, which Airflow refuses: every poll would fail.
    bucket_url, options = bucket
    drop(bucket_url, options, "Shoot 12")
    drop(bucket_url, options, "shoot-12")
    with caplog.at_level("WARNING", logger="tasks.feedback.drops"):
        assert [d["batch"] for d in new_drops(bucket_url, options)] == ["shoot-12"]
    assert "incoming/Shoot 12/: left alone, not a batch name" in caplog.text
