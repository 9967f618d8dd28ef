"""The correction queue and the retraining pool on a real S3 API (moto_server) and a local folder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import json
import threading

import cv2
import numpy as np
import pytest

from tasks.feedback import queue as c
from tasks.core import storage
from tasks.dev.synth import encode_jpeg, encode_png


def synthetic_pair(width: int = 120, height: int = 90, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A photo of an ellipse on grey (JPEG bytes), its true mask and a 'predicted' mask missing the lower third."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 200, np.uint8)
    truth = np.zeros((height, width), np.uint8)
    cv2.ellipse(truth, (width // 2, height // 2), (width // 3, height // 3), 0, 0, 360, 255, -1)
    image[truth > 0] = rng.integers(20, 120, 3, dtype=np.uint8)
    predicted = truth.copy()
    predicted[2 * height // 3:] = 0
    return encode_jpeg(image), truth, predicted


def queue_one(bucket_url, options, stem="shirt-1", batch="b1", score=0.41, created_at="") -> c.QueueItem:
    image_jpeg, _, predicted = synthetic_pair()
    item = c.QueueItem(stem=stem, batch=batch, source_url=f"{bucket_url}/incoming/{batch}/{stem}.jpg", score=score,
                       threshold=0.8, model_uri="models:/bgremoval@champion", model_version="3", created_at=created_at)
    c.enqueue(bucket_url, item, image_jpeg, encode_png(predicted), options)
    return item


def all_keys(bucket_url, options) -> dict[str, str]:
    return {o.relpath: o.etag for o in storage.list_objects(bucket_url, options)}


def test_item_ids_are_path_safe_stable_and_distinct():
    assert c.make_item_id("web-1", "shirt_01") == "web-1--shirt_01"
    odd = c.make_item_id("web 1", "../etc/passwd")
    assert c.check_id(odd) == odd and "/" not in odd and not odd.startswith(".")
    assert c.make_item_id("a b", "x") != c.make_item_id("a_b", "x")
    assert c.make_item_id("a b", "x") == c.make_item_id("a b", "x")
    assert c.check_id(c.make_item_id("b", "café ü"))
    with pytest.raises(c.CorrectionsError):
        c.check_id("../x")


def test_enqueue_lists_and_reads_an_item(bucket):
    bucket_url, options = bucket
    item = queue_one(bucket_url, options)
    queue = c.list_queue(bucket_url, options)
    assert [q["item_id"] for q in queue] == ["b1--shirt-1"]
    entry = queue[0]
    assert entry["status"] == "open" and entry["decision"] is None
    assert entry["score"] == pytest.approx(0.41) and entry["threshold"] == 0.8
    assert (entry["width"], entry["height"]) == (120, 90) and entry["model_version"] == "3"
    assert c.read_item(bucket_url, item.item_id, options)["source_url"].endswith("/incoming/b1/shirt-1.jpg")
    mask = cv2.imdecode(np.frombuffer(c.read_item_file(bucket_url, item.item_id, "mask", options), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.ndim == 2 and mask.shape == (90, 120) and set(np.unique(mask)) == {0, 255}
    assert c.read_item_file(bucket_url, item.item_id, "image", options)[:2] == b"\xff\xd8"
    with pytest.raises(FileNotFoundError):
        c.read_item(bucket_url, "b1--nope", options)
    with pytest.raises(FileNotFoundError):
        c.read_item_file(bucket_url, item.item_id, "final_mask", options)
    # the worst-scored photo comes first, whatever its age; equal scores: the oldest first
    queue_one(bucket_url, options, stem="shirt-2", score=0.12, created_at="2030-01-01T00:00:00+00:00")
    queue_one(bucket_url, options, stem="shirt-3", score=0.41, created_at="2000-01-01T00:00:00+00:00")
    assert [q["item_id"] for q in c.list_queue(bucket_url, options)] == ["b1--shirt-2", "b1--shirt-3", "b1--shirt-1"]


def test_pages_of_the_queue_read_only_their_own_items(bucket, monkeypatch):
    bucket_url, options = bucket
    for i in range(7):
        queue_one(bucket_url, options, stem=f"s{i}", score=0.1 * (7 - i), created_at=f"2030-01-01T00:00:0{i}+00:00")
    c.decide(bucket_url, "b1--s6", "rejected", "ann", storage_options=options)  # the worst one is decided
    read = []
    real_read_many = storage.read_many
    monkeypatch.setattr(storage, "read_many", lambda urls, opts=None: read.extend(urls) or real_read_many(urls, opts))
    first = c.queue_page(bucket_url, options, offset=0, limit=4)
    assert [i["item_id"] for i in first.items] == ["b1--s5", "b1--s4", "b1--s3", "b1--s2"]
    assert (first.total, first.n_open) == (6, 6)
    assert len(read) == 4  # four item.json, nothing else
    rest = c.queue_page(bucket_url, options, offset=4, limit=4)
    assert [i["item_id"] for i in rest.items] == ["b1--s1", "b1--s0"]
    everything = c.queue_page(bucket_url, options, include_done=True, limit=2)
    assert [(i["item_id"], i["status"]) for i in everything.items] == [("b1--s6", "rejected"), ("b1--s5", "open")]
    assert everything.total == 7
    with pytest.raises(ValueError):
        c.queue_page(bucket_url, options, limit=0)


def test_an_item_without_its_index_key_is_indexed_on_the_next_listing(bucket):
    bucket_url, options = bucket
    queue_one(bucket_url, options, stem="old", score=0.05)
    queue_one(bucket_url, options, stem="new", score=0.5)
    (key,) = [o.url for o in storage.list_objects(f"{bucket_url}/corrections/index", options) if o.relpath.endswith("--b1--old")]
    storage.remove(key, options)  # as if queued before the index existed
    assert c.queue_order(bucket_url, options).ids == ["b1--old", "b1--new"]
    assert storage.exists(key, options)


def test_enqueue_refuses_a_mask_of_another_size_and_never_rewrites_an_item(bucket):
    bucket_url, options = bucket
    image_jpeg, _, predicted = synthetic_pair()
    item = c.QueueItem(stem="s", batch="b", source_url="s3://x/incoming/b/s.jpg", score=0.2, threshold=0.8)
    with pytest.raises(c.CorrectionsError, match="120x90"):
        c.enqueue(bucket_url, item, image_jpeg, encode_png(predicted[:50]), options)
    assert c.list_queue(bucket_url, options) == []
    c.enqueue(bucket_url, item, image_jpeg, encode_png(predicted), options)
    before = all_keys(bucket_url, options)
    again = c.QueueItem(stem="s", batch="b", source_url="s3://x/incoming/b/s.jpg", score=0.9, threshold=0.8)
    c.enqueue(bucket_url, again, image_jpeg, encode_png(np.zeros_like(predicted)), options)  # a retried task
    assert all_keys(bucket_url, options) == before
    assert c.read_item(bucket_url, item.item_id, options)["score"] == pytest.approx(0.2)


def test_accept_correct_reject_and_the_pool(bucket):
    bucket_url, options = bucket
    a = queue_one(bucket_url, options, stem="a", created_at="2030-01-01T00:00:01+00:00")
    b = queue_one(bucket_url, options, stem="b", created_at="2030-01-01T00:00:02+00:00")
    r = queue_one(bucket_url, options, stem="r", created_at="2030-01-01T00:00:03+00:00")
    _, truth, predicted = synthetic_pair()

    accepted = c.decide(bucket_url, a.item_id, "accepted", "ann", storage_options=options)
    assert accepted["mask_source"] == "predicted" and accepted["user"] == "ann"
    soft = truth.copy()
    soft[truth > 0] = 200  # not binary: binarised on save
    corrected = c.decide(bucket_url, b.item_id, "corrected", "bob", mask_png=encode_png(soft), mask_source="brush", note="bottom hem",
                          storage_options=options)
    assert corrected["decision"] == "corrected" and corrected["note"] == "bottom hem"
    c.decide(bucket_url, r.item_id, "rejected", "cat", note="blurry", storage_options=options)

    assert c.list_queue(bucket_url, options) == []
    everything = c.list_queue(bucket_url, options, include_done=True)
    assert [(q["item_id"], q["status"], q["decision"]["user"]) for q in everything] == [
        (a.item_id, "accepted", "ann"), (b.item_id, "corrected", "bob"), (r.item_id, "rejected", "cat")]
    decision = json.loads(storage.read_bytes(f"{bucket_url}/corrections/done/{b.item_id}/decision.json", options))
    assert decision == {**corrected} and decision["at"].endswith("+00:00")

    final = cv2.imdecode(np.frombuffer(c.read_item_file(bucket_url, b.item_id, "final_mask", options), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(final, truth)
    assert not storage.exists(f"{bucket_url}/corrections/done/{r.item_id}/mask.png", options)

    pool = c.list_pool(bucket_url, options)
    assert [(p["pair_id"], p["origin"], p["user"]) for p in pool] == [(a.item_id, "accepted", "ann"), (b.item_id, "corrected", "bob")]
    assert pool[1]["source_url"].endswith("/incoming/b1/b.jpg") and pool[1]["model_version"] == "3"
    assert pool[1]["stem"] == "b" and pool[1]["mask_source"] == "brush" and pool[1]["score"] == pytest.approx(0.41)
    pool_mask = cv2.imdecode(np.frombuffer(storage.read_bytes(pool[1]["mask_url"], options), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(pool_mask, truth)
    assert storage.read_bytes(pool[1]["image_url"], options) == c.read_item_file(bucket_url, b.item_id, "image", options)
    assert [p["pair_id"] for p in c.list_pool(bucket_url, options, since=pool[0]["at"])] == [b.item_id]
    # Nothing in the queue was deleted or changed by deciding.
    assert {k.split("/")[-1] for k in all_keys(bucket_url, options) if k.startswith(f"corrections/queue/{r.item_id}/")} == {
        "item.json", "image.jpg", "mask.png"}
    assert np.array_equal(
        cv2.imdecode(np.frombuffer(c.read_item_file(bucket_url, b.item_id, "mask", options), np.uint8), cv2.IMREAD_UNCHANGED), predicted)


@pytest.mark.parametrize(
    ("decision", "mask", "source", "message"),
    [
        ("corrected", "small", "upload", "same size"),
        ("corrected", "empty", "brush", "empty"),
        ("corrected", "junk", "upload", "not a PNG"),
        ("corrected", None, "upload", "needs the corrected mask"),
        ("corrected", "good", "predicted", "mask_source"),
        ("accepted", "good", None, "only with 'corrected'"),
        ("rejected", "good", None, "takes no mask"),
        ("approved", None, None, "decision must be one of"),
    ],
)
def test_bad_decisions_are_refused_and_write_nothing(bucket, decision, mask, source, message):
    bucket_url, options = bucket
    item = queue_one(bucket_url, options)
    _, truth, _ = synthetic_pair()
    masks = {"small": encode_png(truth[:45, :60]), "empty": encode_png(np.zeros_like(truth)), "junk": b"not a png",
             "good": encode_png(truth), None: None}
    before = all_keys(bucket_url, options)
    with pytest.raises(c.CorrectionsError, match=message):
        c.decide(bucket_url, item.item_id, decision, "ann", mask_png=masks[mask], mask_source=source, storage_options=options)
    assert all_keys(bucket_url, options) == before
    assert c.read_item(bucket_url, item.item_id, options)["status"] == "open"


def test_a_second_decision_is_refused(bucket):
    bucket_url, options = bucket
    item = queue_one(bucket_url, options)
    c.decide(bucket_url, item.item_id, "rejected", "ann", storage_options=options)
    with pytest.raises(c.AlreadyDecided, match="already rejected by ann"):
        c.decide(bucket_url, item.item_id, "accepted", "bob", storage_options=options)
    assert c.read_decision(bucket_url, item.item_id, options)["user"] == "ann"
    assert c.list_pool(bucket_url, options) == []


def test_two_reviewers_at_once_only_one_wins(bucket):
    bucket_url, options = bucket
    item = queue_one(bucket_url, options)
    _, truth, _ = synthetic_pair()
    barrier, results = threading.Barrier(4), {}

    def answer(user: str) -> None:
        barrier.wait()
        try:
            results[user] = c.decide(bucket_url, item.item_id, "corrected", user, mask_png=encode_png(truth), storage_options=options)
        except c.AlreadyDecided as exc:
            results[user] = exc

    threads = [threading.Thread(target=answer, args=(f"user{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [u for u, r in results.items() if isinstance(r, dict)]
    assert len(winners) == 1, results
    assert c.read_decision(bucket_url, item.item_id, options)["user"] == winners[0]
    assert [p["user"] for p in c.list_pool(bucket_url, options)] == winners


def test_a_stale_claim_from_a_dead_request_is_taken_over(bucket):
    bucket_url, options = bucket
    item = queue_one(bucket_url, options)
    claim = f"{bucket_url}/corrections/done/{item.item_id}/claim.json"
    storage.write_text(claim, json.dumps({"user": "ann", "at": "2020-01-01T00:00:00+00:00", "token": "x"}), options)
    assert c.decide(bucket_url, item.item_id, "accepted", "bob", storage_options=options)["user"] == "bob"
    fresh = queue_one(bucket_url, options, stem="fresh")
    storage.write_text(f"{bucket_url}/corrections/done/{fresh.item_id}/claim.json",
                       json.dumps({"user": "ann", "at": c.now_iso(), "token": "y"}), options)
    with pytest.raises(c.AlreadyDecided, match="being decided by ann"):
        c.decide(bucket_url, fresh.item_id, "accepted", "bob", storage_options=options)


def test_two_takeovers_of_one_stale_claim_only_one_proceeds(bucket):
    bucket_url, options = bucket
    item = queue_one(bucket_url, options)
    claim = f"{bucket_url}/corrections/done/{item.item_id}/claim.json"
    storage.write_text(claim, json.dumps({"user": "ann", "at": "2020-01-01T00:00:00+00:00", "token": "dead"}), options)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda user: _attempt(bucket_url, item.item_id, user, options), ["b", "c", "d", "e"]))
    assert sorted(outcome == "decided" for outcome in outcomes) == [False, False, False, True]
    assert all(outcome == "decided" or "taken over" in outcome or "being decided" in outcome
               or "already" in outcome for outcome in outcomes)


def _attempt(bucket_url, item_id, user, options) -> str:
    try:
        c.decide(bucket_url, item_id, "accepted", user, storage_options=options)
    except c.AlreadyDecided as refused:
        return str(refused)
    return "decided"


def test_a_decision_that_fails_half_way_frees_the_item_at_once(bucket, monkeypatch):
    bucket_url, options = bucket
    item = queue_one(bucket_url, options)

    def storage_down(*args, **kwargs):
        raise OSError("the object store went away")

    with monkeypatch.context() as patched:
        patched.setattr(c, "add_to_pool", storage_down)
        with pytest.raises(OSError, match="went away"):
            c.decide(bucket_url, item.item_id, "accepted", "ann", storage_options=options)
    assert not storage.exists(f"{bucket_url}/corrections/done/{item.item_id}/claim.json", options)
    assert c.decide(bucket_url, item.item_id, "accepted", "bob", storage_options=options)["user"] == "bob"


def test_published_pairs_human_pairs_win_and_retries_change_nothing(bucket):
    bucket_url, options = bucket
    image_jpeg, truth, predicted = synthetic_pair()
    pair = c.make_item_id("b1", "shirt-1")
    meta = c.PoolMeta(origin="published", source_url="s3://x/incoming/b1/shirt-1.jpg", score=0.97, model_version="3")
    url = c.add_to_pool(bucket_url, pair, image_jpeg, encode_png(predicted), meta, options)
    assert url == f"{bucket_url}/retraining-pool/{pair}"
    first = c.list_pool(bucket_url, options)
    assert [(p["origin"], p["user"]) for p in first] == [("published", None)]
    c.add_to_pool(bucket_url, pair, image_jpeg, encode_png(truth), {**vars(meta), "at": ""}, options)  # retry
    assert c.list_pool(bucket_url, options) == first
    human = c.PoolMeta(origin="corrected", source_url=meta.source_url, user="ann")
    c.add_to_pool(bucket_url, pair, image_jpeg, encode_png(truth), human, options)
    c.add_to_pool(bucket_url, pair, image_jpeg, encode_png(predicted), meta, options)  # a later prediction loses
    (entry,) = c.list_pool(bucket_url, options)
    assert (entry["origin"], entry["user"]) == ("corrected", "ann")
    assert np.array_equal(cv2.imdecode(np.frombuffer(storage.read_bytes(entry["mask_url"], options), np.uint8), 0), truth)
    with pytest.raises(c.CorrectionsError, match="origin"):
        c.PoolMeta(origin="guessed", source_url="x")
    with pytest.raises(c.CorrectionsError, match="empty"):
        c.add_to_pool(bucket_url, "other", image_jpeg, encode_png(np.zeros_like(truth)), meta, options)


def test_prepare_pair_transposes_exif_and_downscales():
    import io

    from PIL import Image

    photo = Image.new("RGB", (200, 100), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    raw = io.BytesIO()
    photo.save(raw, format="JPEG", exif=exif)
    mask = np.zeros((200, 100), np.uint8)
    mask[50:150, 20:80] = 1
    image_jpeg, mask_png = c.prepare_pair(raw.getvalue(), mask, max_side=100)
    shown = Image.open(io.BytesIO(image_jpeg))
    decoded = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert shown.size == (50, 100) and shown.mode == "RGB"
    assert decoded.shape == (100, 50) and set(np.unique(decoded)) == {0, 255}
    with pytest.raises(c.CorrectionsError, match="photo is 100x200"):
        c.prepare_pair(raw.getvalue(), np.zeros((100, 200), np.uint8))


def test_a_412_without_its_condition_as_minio_answers_is_an_existing_object(s3_bucket, monkeypatch):
    import errno

    bucket_url, options = s3_bucket
    fs, _ = storage.filesystem(f"{bucket_url}/x", options)  # the (cached) client create_exclusive writes with

    def minio_412(path, data, mode="overwrite", **kwargs):
        raise OSError(errno.EINVAL, "An error occurred (PreconditionFailed) when calling the PutObject operation: "
                                    "At least one of the pre-conditions you specified did not hold (412)")

    monkeypatch.setattr(fs, "pipe_file", minio_412)
    with pytest.raises(FileExistsError):
        storage.create_exclusive(f"{bucket_url}/corrections/done/x/decision.json", b"{}", options)

    def other_error(path, data, mode="overwrite", **kwargs):
        raise OSError(errno.EINVAL, "InvalidArgument: something else")

    monkeypatch.setattr(fs, "pipe_file", other_error)
    with pytest.raises(OSError, match="something else") as raised:
        storage.create_exclusive(f"{bucket_url}/corrections/done/y/decision.json", b"{}", options)
    assert not isinstance(raised.value, FileExistsError)
