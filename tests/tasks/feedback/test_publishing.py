"""Photos a person accepted or corrected are published with the decided mask, once."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np

from tasks.core import layout, storage
from tasks.dev.synth import encode_jpeg, encode_png
from tasks.feedback import queue as q
from tasks.feedback.publishing import publish_decision, publish_decisions, published_marker


def _queued(bucket_url: str, options, stem: str, width: int = 300, height: int = 200, canvas=None) -> tuple[str, np.ndarray]:
    """A photo in incoming/, queued at half size (as a large photo is for the page); returns the item id
    and the true mask at the queued size."""
    image = np.full((height, width, 3), 235, np.uint8)
    truth = np.zeros((height, width), np.uint8)
    cv2.rectangle(truth, (width // 4, height // 4), (3 * width // 4, 3 * height // 4), 255, -1)
    image[truth > 0] = (180, 40, 40)
    source = storage.join(bucket_url, "incoming", "b1", f"{stem}.jpg")
    photo = encode_jpeg(image)
    storage.write_bytes(source, photo, options)
    predicted = truth.copy()
    predicted[height // 2:] = 0  # the model missed the lower half
    image_jpeg, mask_png = q.prepare_pair(photo, predicted, max_side=max(width, height) // 2)
    item = q.QueueItem(stem=stem, batch="b1", source_url=source, score=0.3, threshold=0.8,
                       source_sha256=hashlib.sha256(photo).hexdigest(),
                       outputs={"background": "#000000", "canvas": canvas, "margin": 0.05})
    q.enqueue(bucket_url, item, image_jpeg, mask_png, options)
    small = cv2.resize(truth, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    return item.item_id, np.where(small >= 128, 255, 0).astype(np.uint8)


def test_a_corrected_photo_is_published_at_full_size_with_the_corrected_mask(bucket):
    bucket_url, options = bucket
    item_id, corrected = _queued(bucket_url, options, "shirt")
    assert publish_decision(bucket_url, item_id, options) is None  # open: nothing to publish
    q.decide(bucket_url, item_id, "corrected", "ana", mask_png=encode_png(corrected), storage_options=options)
    record = publish_decision(bucket_url, item_id, options)
    assert record["decision"] == "corrected" and record["user"] == "ana"
    folder = layout.published(bucket_url, "b1")
    assert sorted(record["files"]) == ["composite_jpeg", "cutout_png", "mask_png"]
    mask = cv2.imdecode(np.frombuffer(storage.read_bytes(storage.join(folder, "masks", "shirt.png"), options),
                                      np.uint8), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (200, 300)  # the original photo's size, not the page's copy
    assert mask[140, 150] == 255 and mask[10, 10] == 0  # the corrected lower half is in
    cutout = cv2.imdecode(np.frombuffer(storage.read_bytes(storage.join(folder, "shirt.png"), options), np.uint8),
                          cv2.IMREAD_UNCHANGED)
    assert cutout.shape == (200, 300, 4) and cutout[140, 150, 3] == 255
    on_black = cv2.imdecode(np.frombuffer(storage.read_bytes(storage.join(folder, "shirt.jpg"), options), np.uint8),
                            cv2.IMREAD_COLOR)
    assert on_black[10, 10].max() < 20  # the run's background
    # once: a second call returns the record, writes nothing
    before = storage.read_bytes(published_marker(bucket_url, item_id), options)
    assert publish_decision(bucket_url, item_id, options) == json.loads(before)
    assert publish_decisions(bucket_url, options) == {"published": [], "failed": {}}


def test_the_catch_up_publishes_accepted_items_skips_rejected_ones_and_reports_failures(bucket):
    bucket_url, options = bucket
    accepted, _ = _queued(bucket_url, options, "accepted", canvas="200x200")
    rejected, _ = _queued(bucket_url, options, "rejected")
    vanished, corrected = _queued(bucket_url, options, "vanished")
    q.decide(bucket_url, accepted, "accepted", "ana", storage_options=options)
    q.decide(bucket_url, rejected, "rejected", "ana", storage_options=options)
    q.decide(bucket_url, vanished, "corrected", "bo", mask_png=encode_png(corrected), storage_options=options)
    storage.remove(storage.join(bucket_url, "incoming", "b1", "vanished.jpg"), options)
    done = publish_decisions(bucket_url, options)
    assert done["published"] == [accepted] and list(done["failed"]) == [vanished]
    folder = layout.published(bucket_url, "b1")
    cutout = cv2.imdecode(np.frombuffer(storage.read_bytes(storage.join(folder, "accepted.png"), options), np.uint8),
                          cv2.IMREAD_UNCHANGED)
    assert cutout.shape == (200, 200, 4)  # on the run's canvas
    assert not storage.exists(storage.join(folder, "rejected.png"), options)
    assert not storage.exists(published_marker(bucket_url, vanished), options)  # tried again next time


def test_a_mask_drawn_on_the_original_photo_is_taken_for_its_smaller_copy(bucket):
    """The page shows a copy of a large photo; the reviewer's file is often the photo's own size."""
    bucket_url, options = bucket
    item_id, _ = _queued(bucket_url, options, "large")
    full = np.zeros((200, 300), np.uint8)
    full[50:150, 75:225] = 255
    record = q.decide(bucket_url, item_id, "corrected", "ana", mask_png=encode_png(full), storage_options=options)
    assert record["decision"] == "corrected"
    stored = cv2.imdecode(np.frombuffer(storage.read_bytes(storage.join(q.done_url(bucket_url, item_id), "mask.png"),
                                                           options), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert stored.shape == (100, 150) and stored[50, 75] == 255 and stored[5, 5] == 0


def test_a_photo_replaced_since_it_was_queued_is_not_published_with_the_old_mask(bucket):
    """A later drop may replace a photo under the same name; the decided mask belongs to the old one."""
    bucket_url, options = bucket
    item_id, corrected = _queued(bucket_url, options, "replaced")
    q.decide(bucket_url, item_id, "corrected", "ana", mask_png=encode_png(corrected), storage_options=options)
    other = np.full((100, 400, 3), 90, np.uint8)
    storage.write_bytes(storage.join(bucket_url, "incoming", "b1", "replaced.jpg"), encode_jpeg(other), options)
    done = publish_decisions(bucket_url, options)
    assert done["published"] == [] and "changed since it was queued" in done["failed"][item_id]
    assert not storage.exists(storage.join(layout.published(bucket_url, "b1"), "replaced.png"), options)
