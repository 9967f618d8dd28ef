"""The mask-correction queue and the retraining pool (storage only; no Airflow, no web code).

The inference DAG puts doubtful predictions in a queue; a person accepts, rejects or corrects
each one on the correction page; accepted and corrected masks (and the confident predictions the
DAG publishes) go into the retraining pool the retraining DAG reads. Layout below a bucket URL::

    corrections/queue/<item_id>/item.json     QueueItem fields (written last: it marks the item)
    corrections/queue/<item_id>/image.jpg     the photo (EXIF-transposed RGB JPEG)
    corrections/queue/<item_id>/mask.png      the predicted mask (8-bit L, 0/255, image size)
    corrections/done/<item_id>/claim.json     who is deciding right now (a lock, see decide())
    corrections/done/<item_id>/mask.png       the final mask (accepted / corrected only)
    corrections/done/<item_id>/decision.json  the decision (written last: it commits it)
    retraining-pool/<pair_id>/image.jpg, mask.png, meta.json (meta.json written last)

Queue items are never modified or deleted; an item is *open* while its ``decision.json`` does
not exist. Every write goes through :func:`tasks.core.storage.write_bytes` (one atomic PUT on S3,
a renamed temporary file on disk) or an exclusive create, so a reader never sees half an object.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import cv2
import numpy as np

from tasks.core import layout, storage
from tasks.core.codecs import decode_mask_file, encode_png, image_size
from tasks.feedback.config import MAX_MASK_BYTES

DECISIONS = ("accepted", "rejected", "corrected")
MASK_SOURCES = ("predicted", "brush", "upload")
POOL_ORIGINS = ("published", "accepted", "corrected")
HUMAN_ORIGINS = ("accepted", "corrected")
CLAIM_STALE_AFTER = timedelta(minutes=10)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NOTE_CHARS = 2000


class CorrectionsError(ValueError):
    """A request that cannot be carried out: bad decision, bad mask, unknown id (nothing written)."""


class AlreadyDecided(CorrectionsError):
    """The item already has a decision, or another reviewer is deciding it right now."""


def now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds (sortable; used for every ``at``)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def make_item_id(batch: str, stem: str) -> str:
    """Return the path-safe id ``f"{batch}--{stem}"`` of a photo.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; when anything had to change (or the id
    is too long), an 8-hex hash of the original is appended so two different names never share
    an id. The same batch and stem always give the same id.
    """
    raw = f"{batch}--{stem}"
    safe = _UNSAFE_CHARS.sub("_", raw).strip("._-")
    if safe != raw or len(safe) > 180 or not safe:
        digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
        safe = f"{safe[:180] or 'item'}-{digest}"
    return safe


def photo_id(bucket_url: str, batch: str, stem: str, source_sha256: str,
             storage_options: dict | None = None) -> str:
    """The id of a dropped photo's queue item and pool pair: :func:`make_item_id` of batch and stem,
    unless that id already holds a different photo (the same name dropped again under the same batch
    with new content: its recorded ``source_sha256`` differs); then that id with the new photo's
    digest appended. So a retried shard finds its own items (same content, same id) and skips them,
    while a re-drop is processed, and the earlier photo's item, decision and pair are kept."""
    base_id = make_item_id(batch, stem)
    for url in (storage.join(queue_url(bucket_url, base_id), "item.json"),
                storage.join(pool_url(bucket_url, base_id), "meta.json")):
        storage.forget_listings(url, storage_options)
        try:
            recorded = _read_json(url, storage_options).get("source_sha256")
        except FileNotFoundError:
            continue
        if recorded and recorded != source_sha256:
            return check_id(f"{base_id[:180]}--{source_sha256[:12]}")
    return base_id


def _records(bucket_url: str, item_id: str, storage_options: dict | None) -> list[dict]:
    """The queue item's ``item.json`` (``kind`` queued) and the pool pair's ``meta.json`` (``kind``
    pooled) under ``item_id``, those that exist, each read once."""
    found = []
    for kind, url in (("queued", storage.join(queue_url(bucket_url, item_id), "item.json")),
                      ("pooled", storage.join(pool_url(bucket_url, item_id), "meta.json"))):
        storage.forget_listings(url, storage_options)
        try:
            found.append({**_read_json(url, storage_options), "kind": kind})
        except FileNotFoundError:
            continue
    return found


def handled_record(bucket_url: str, batch: str, stem: str, read_photo: Callable[[], bytes],
                   storage_options: dict | None = None) -> dict | None:
    """What became of this photo before: the record (``item.json`` or ``meta.json``, with ``kind``
    queued or pooled) of a queue item or pool pair holding these bytes under the id
    :func:`photo_id` gives them; None when there is none. ``read_photo`` is called only when the
    photo's name has a record at all (a new photo is not read twice)."""
    base_id = make_item_id(batch, stem)
    records = _records(bucket_url, base_id, storage_options)
    if not records:
        return None
    digest = hashlib.sha256(read_photo()).hexdigest()
    if any(r.get("source_sha256") not in (None, "", digest) for r in records):  # another photo: its own id
        records = _records(bucket_url, check_id(f"{base_id[:180]}--{digest[:12]}"), storage_options)
    return next((r for r in records if r.get("source_sha256") == digest), None)


def check_id(value: str, what: str = "item id") -> str:
    """Return ``value`` when it is a safe id (``[A-Za-z0-9._-]``, 1-200, no leading dot); else raise."""
    if not isinstance(value, str) or not _SAFE_ID.match(value):
        raise CorrectionsError(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' (at most 200)")
    return value


@dataclass(frozen=True)
class QueueItem:
    """What the inference DAG knows about a doubtful prediction (becomes ``item.json``).

    ``score`` is the quality score of the prediction and ``threshold`` the score below which it
    was queued instead of published. ``item_id`` defaults to :func:`make_item_id` of batch and stem,
    ``created_at`` to now.
    """

    stem: str
    batch: str
    source_url: str
    score: float
    threshold: float
    model_uri: str = ""
    model_version: str = ""
    created_at: str = ""
    item_id: str = ""
    source_sha256: str = ""
    #: The production run that queued it (a retry of that run's shard finds its own items).
    run_id: str = ""
    #: How the run would have published it (``background``, ``canvas``, ``margin``): a decided item
    #: is published the same way (:mod:`tasks.feedback.publishing`).
    outputs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.item_id:
            object.__setattr__(self, "item_id", make_item_id(self.batch, self.stem))
        check_id(self.item_id)
        if not self.created_at:
            object.__setattr__(self, "created_at", now_iso())
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "threshold", float(self.threshold))

    def to_dict(self) -> dict:
        """The ``item.json`` content."""
        return asdict(self)


@dataclass(frozen=True)
class PoolMeta:
    """What the retraining pool records about a pair (becomes ``meta.json``).

    ``origin`` is ``published`` (a confident prediction), ``accepted`` or ``corrected`` (a person's
    decision; ``user`` says who). ``at`` defaults to now.
    """

    origin: str
    source_url: str
    score: float | None = None
    model_version: str = ""
    user: str | None = None
    at: str = ""
    item_id: str | None = None
    source_sha256: str = ""
    #: The production run that published it ("" for a person's pair).
    run_id: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.origin not in POOL_ORIGINS:
            raise CorrectionsError(f"pool origin must be one of {POOL_ORIGINS}, not {self.origin!r}")
        if not self.at:
            object.__setattr__(self, "at", now_iso())


# ---------------------------------------------------------------- URLs


def queue_url(bucket_url: str, item_id: str) -> str:
    """``<bucket_url>/corrections/queue/<item_id>`` (the id is validated)."""
    return storage.join(layout.corrections_queue(bucket_url), check_id(item_id))


def done_url(bucket_url: str, item_id: str) -> str:
    """``<bucket_url>/corrections/done/<item_id>`` (the id is validated)."""
    return storage.join(layout.corrections_done(bucket_url), check_id(item_id))


def pool_url(bucket_url: str, pair_id: str) -> str:
    """``<bucket_url>/retraining-pool/<pair_id>`` (the id is validated)."""
    return storage.join(layout.retraining_pool(bucket_url), check_id(pair_id, "pair id"))


# ---------------------------------------------------------------- images


def _decode_image_size(image_jpeg: bytes) -> tuple[int, int]:
    try:
        return image_size(image_jpeg)
    except ValueError:
        raise CorrectionsError("the image does not decode (expected JPEG bytes)") from None


def binarise_mask(mask_bytes: bytes, size: tuple[int, int]) -> np.ndarray:
    """Decode a mask PNG of ``size`` (``(width, height)``) to an HxW uint8 array of 0/255; a mask of the
    original photo, larger than the page's copy with the same aspect ratio, is shrunk to ``size``.

    Format, size and the :data:`MAX_MASK_BYTES` limit are checked from the header before any pixel
    is decoded (:func:`tasks.core.codecs.decode_mask_file`: grey, RGB, 16-bit, or a not fully
    opaque alpha channel as the mask). Raises :class:`CorrectionsError` when the file does not
    fit or the mask is empty.
    """
    if not mask_bytes:
        raise CorrectionsError("the mask file is empty (0 bytes)")
    try:
        mask = decode_mask_file(mask_bytes, size, MAX_MASK_BYTES, reference="the image", shrink_to_fit=True)
    except ValueError as exc:
        raise CorrectionsError(str(exc)) from None
    if not mask.any():
        raise CorrectionsError("the mask is empty (no foreground pixel); reject the item instead")
    return mask


def prepare_pair(image_bytes: bytes, mask: np.ndarray | bytes, max_side: int | None = None,
                 quality: int = 92) -> tuple[bytes, bytes]:
    """Turn an original photo and a predicted mask into what :func:`enqueue` stores.

    Takes the photo's bytes (any format Pillow reads; EXIF orientation is applied, the result
    is RGB), the mask (an HxW array, 0-255 or 0/1 are both fine, or PNG bytes) at the photo's
    transposed size, and an optional ``max_side`` to downscale both for the page. Returns
    ``(image_jpeg, mask_png)`` of the same size, the mask binarised to 0/255.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if isinstance(mask, (bytes, bytearray)):
        array = cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_GRAYSCALE)
        if array is None:
            raise CorrectionsError("the predicted mask does not decode")
    else:
        array = np.asarray(mask)
        if array.dtype != np.uint8 or array.max() <= 1:
            array = (array.astype(np.float32) * (255.0 if array.max() <= 1 else 1.0)).clip(0, 255).astype(np.uint8)
    if (array.shape[1], array.shape[0]) != image.size:
        raise CorrectionsError(f"mask is {array.shape[1]}x{array.shape[0]} but the photo is {image.size[0]}x{image.size[1]}")
    if max_side and max(image.size) > max_side:
        factor = max_side / max(image.size)
        new_size = (max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
        array = cv2.resize(array, new_size, interpolation=cv2.INTER_AREA)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue(), encode_png(np.where(array >= 128, 255, 0).astype(np.uint8))


# ---------------------------------------------------------------- low-level storage


def _read_json(url: str, storage_options: dict | None) -> dict:
    return json.loads(storage.read_bytes(url, storage_options))


def _json_bytes(data: dict) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")


def _exists(url: str, storage_options: dict | None) -> bool:
    """``storage.exists`` without trusting cached listings."""
    storage.forget_listings(url, storage_options)
    return storage.exists(url, storage_options)


def _list(prefix_url: str, storage_options: dict | None):
    """``storage.list_objects`` without trusting cached listings."""
    storage.forget_listings(prefix_url, storage_options)
    return storage.list_objects(prefix_url, storage_options)


# ---------------------------------------------------------------- queue


def enqueue(bucket_url: str, item: QueueItem, image_jpeg: bytes, mask_png: bytes,
            storage_options: dict | None = None) -> str:
    """Put a doubtful prediction in the correction queue; returns the item's queue URL.

    Takes the bucket URL (``s3://bucket``), the :class:`QueueItem`, the photo as an RGB JPEG and
    the predicted mask as PNG of the same size (see :func:`prepare_pair`). The mask is stored
    binarised to 0/255 (an empty predicted mask is allowed: that is what a person must fix).
    ``item.json`` is written after the pictures, so a listed item is always complete, then its
    index key (:func:`queue_order`). Items are never
    modified: enqueueing an id that is already queued (a retried task) leaves it as it was.
    """
    base = queue_url(bucket_url, item.item_id)
    if _exists(storage.join(base, "item.json"), storage_options):
        return base
    size = _decode_image_size(image_jpeg)
    decoded = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if decoded is None:
        raise CorrectionsError("the predicted mask does not decode (expected PNG bytes)")
    if (decoded.shape[1], decoded.shape[0]) != size:
        raise CorrectionsError(f"the predicted mask is {decoded.shape[1]}x{decoded.shape[0]} but the image is {size[0]}x{size[1]}")
    storage.write_bytes(storage.join(base, "image.jpg"), image_jpeg, storage_options)
    storage.write_bytes(storage.join(base, "mask.png"), encode_png(np.where(decoded >= 128, 255, 0).astype(np.uint8)), storage_options)
    record = {**item.to_dict(), "width": size[0], "height": size[1]}
    storage.write_bytes(storage.join(base, "item.json"), _json_bytes(record), storage_options)
    _write_index(bucket_url, record, storage_options)
    return base


def _index_name(record: dict) -> str:
    """The item's key in :func:`tasks.core.layout.corrections_index` (lexical order = queue order)."""
    score = min(max(float(record.get("score", 0.0)), 0.0), 1.0)
    return f"{score:.6f}--{record['created_at']}--{record['item_id']}"


def _write_index(bucket_url: str, record: dict, storage_options: dict | None) -> None:
    storage.write_bytes(storage.join(layout.corrections_index(bucket_url), _index_name(record)), b"", storage_options)


def _ids_below(root: str, name: str, storage_options: dict | None) -> set[str]:
    """The ids ``<id>/<name>`` directly below ``root``, from one listing."""
    return {o.relpath.split("/")[0] for o in _list(root, storage_options)
            if o.relpath.count("/") == 1 and o.relpath.endswith(f"/{name}")}


@dataclass(frozen=True)
class QueueOrder:
    """The queue from listings only: every item id in order (worst score first, then oldest, then
    id) and the decided ones."""

    ids: list[str]
    decided: set[str]

    def selected(self, include_done: bool) -> list[str]:
        """The open ids in order, or all of them with ``include_done``."""
        return list(self.ids) if include_done else [i for i in self.ids if i not in self.decided]


def queue_order(bucket_url: str, storage_options: dict | None = None) -> QueueOrder:
    """List the queue's order without reading its items (three listings). An item without its
    index key (queued before the index existed, or its task killed between the two writes) is read
    once and indexed."""
    items = _ids_below(layout.corrections_queue(bucket_url), "item.json", storage_options)
    decided = _ids_below(layout.corrections_done(bucket_url), "decision.json", storage_options)
    index_root = layout.corrections_index(bucket_url)
    names = {}
    for o in _list(index_root, storage_options):
        parts = o.relpath.split("--", 2)
        if len(parts) == 3 and parts[2] in items:
            names[parts[2]] = o.relpath
    for item_id in sorted(items - names.keys()):
        record = _read_json(storage.join(queue_url(bucket_url, item_id), "item.json"), storage_options)
        _write_index(bucket_url, record, storage_options)
        names[item_id] = _index_name(record)
    return QueueOrder(ids=sorted(items, key=names.__getitem__), decided=decided & items)


@dataclass(frozen=True)
class QueuePage:
    """One page of the queue: its ``items`` (as :func:`list_queue` gives them), how many items the
    selection holds (``total``) and how many are open."""

    items: list[dict]
    total: int
    n_open: int


def queue_page(bucket_url: str, storage_options: dict | None = None, include_done: bool = False,
               offset: int = 0, limit: int | None = None) -> QueuePage:
    """A page of the correction queue in its order (worst score first, then oldest): the items from
    ``offset``, at most ``limit`` (None: all). Only that page's items (and decisions) are read."""
    if offset < 0 or (limit is not None and limit < 1):
        raise ValueError(f"offset must be >= 0 and limit >= 1, got {offset}, {limit}")
    order = queue_order(bucket_url, storage_options)
    selected = order.selected(include_done)
    chosen = selected[offset:None if limit is None else offset + limit]
    item_urls = [storage.join(queue_url(bucket_url, i), "item.json") for i in chosen]
    decision_urls = [storage.join(done_url(bucket_url, i), "decision.json") for i in chosen if i in order.decided]
    records = storage.read_many(item_urls, storage_options)
    decisions = {json.loads(d)["item_id"]: json.loads(d) for d in storage.read_many(decision_urls, storage_options).values()}
    items = []
    for url in item_urls:
        record = json.loads(records[url])
        decision = decisions.get(record["item_id"])
        items.append({**record, "decision": decision, "status": decision["decision"] if decision else "open"})
    return QueuePage(items=items, total=len(selected), n_open=len(order.ids) - len(order.decided))


def list_queue(bucket_url: str, storage_options: dict | None = None, include_done: bool = False) -> list[dict]:
    """List the whole correction queue, worst first: by quality score (lowest first: the photos most
    likely to need a person's hand), then oldest (``created_at``), then ``item_id``.

    Returns one dict per item: the ``item.json`` fields plus ``status`` (``open`` or the
    decision: ``accepted`` / ``rejected`` / ``corrected``) and ``decision`` (the decision dict,
    or ``None``). Only open items unless ``include_done``. Pages: :func:`queue_page`.
    """
    return queue_page(bucket_url, storage_options, include_done).items


def read_item(bucket_url: str, item_id: str, storage_options: dict | None = None) -> dict:
    """Return one queue item: the ``item.json`` fields plus ``status`` and ``decision``.

    Raises ``FileNotFoundError`` for an unknown item and :class:`CorrectionsError` for a bad id.
    """
    base = queue_url(bucket_url, item_id)
    try:
        record = _read_json(storage.join(base, "item.json"), storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"no queued item {item_id!r} in {bucket_url}") from None
    decision = read_decision(bucket_url, item_id, storage_options)
    record["decision"] = decision
    record["status"] = decision["decision"] if decision else "open"
    return record


def read_decision(bucket_url: str, item_id: str, storage_options: dict | None = None) -> dict | None:
    """Return the item's ``decision.json`` as a dict, or ``None`` while the item is open."""
    try:
        return _read_json(storage.join(done_url(bucket_url, item_id), "decision.json"), storage_options)
    except FileNotFoundError:
        return None


def read_item_file(bucket_url: str, item_id: str, name: str, storage_options: dict | None = None) -> bytes:
    """Return the bytes of ``image`` (the photo), ``mask`` (predicted) or ``final_mask`` (decided).

    Raises ``FileNotFoundError`` when the item (or, for ``final_mask``, a final mask) is missing.
    """
    urls = {
        "image": lambda: storage.join(queue_url(bucket_url, item_id), "image.jpg"),
        "mask": lambda: storage.join(queue_url(bucket_url, item_id), "mask.png"),
        "final_mask": lambda: storage.join(done_url(bucket_url, item_id), "mask.png"),
    }
    if name not in urls:
        raise CorrectionsError(f"unknown item file {name!r}; use one of {sorted(urls)}")
    url = urls[name]()
    if name == "final_mask" and read_decision(bucket_url, item_id, storage_options) is None:
        raise FileNotFoundError(f"item {item_id!r} has no decision yet")
    try:
        return storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


# ---------------------------------------------------------------- decisions


def _claim(bucket_url: str, item_id: str, user: str, storage_options: dict | None) -> str:
    """Take the item's lock (``done/<id>/claim.json``) and return its token, or raise
    :class:`AlreadyDecided`.

    A claim older than :data:`CLAIM_STALE_AFTER` without a decision was left by a request that
    died half-way; it is taken over, exclusively: the first to create
    ``done/<id>/takeover-<stale token>`` may replace the claim, anyone else is refused.
    """
    url = storage.join(done_url(bucket_url, item_id), "claim.json")
    claim = {"user": user, "at": now_iso(), "token": uuid.uuid4().hex}
    try:
        storage.create_exclusive(url, _json_bytes(claim), storage_options)
        return claim["token"]
    except FileExistsError:
        pass
    try:
        held = _read_json(url, storage_options)
    except FileNotFoundError:
        held = {"user": "?", "at": now_iso(), "token": "vanished"}
    since = datetime.fromisoformat(held["at"])
    if datetime.now(timezone.utc) - since < CLAIM_STALE_AFTER:
        raise AlreadyDecided(f"item {item_id!r} is being decided by {held['user']} (since {held['at']})")
    takeover = storage.join(done_url(bucket_url, item_id), f"takeover-{held.get('token', 'none')}")
    try:
        storage.create_exclusive(takeover, _json_bytes(claim), storage_options)
    except FileExistsError:
        raise AlreadyDecided(f"item {item_id!r} is being taken over by someone else") from None
    storage.write_bytes(url, _json_bytes(claim), storage_options)
    return claim["token"]


def _release_claim(bucket_url: str, item_id: str, token: str, storage_options: dict | None) -> None:
    """Remove the item's claim if it is still ours (a decision that failed half-way frees the item)."""
    url = storage.join(done_url(bucket_url, item_id), "claim.json")
    try:
        if _read_json(url, storage_options).get("token") == token:
            storage.remove(url, storage_options)
    except FileNotFoundError:
        pass


def decide(
    bucket_url: str,
    item_id: str,
    decision: str,
    user: str,
    mask_png: bytes | None = None,
    mask_source: str | None = None,
    note: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Record a person's decision on a queued item; returns the ``decision.json`` dict.

    ``decision`` is ``accepted`` (the predicted mask is right; ``mask_png`` must be ``None``),
    ``corrected`` (``mask_png`` is the right mask: PNG bytes of the image's size, binarised to
    0/255, refused when empty; ``mask_source`` is ``brush`` or ``upload``, default ``upload``) or
    ``rejected`` (unusable photo; no mask). Accepted and corrected items also go into the
    retraining pool as pair ``<item_id>`` with the user's name.

    Order of writes: a claim (exclusive create: a second reviewer fails at once), the final
    mask, the pool pair, and ``decision.json`` last (exclusive create again: the commit point).
    So a visible decision always has its mask and its pool pair, and two reviewers answering at
    once never both succeed. Raises :class:`AlreadyDecided` (the item has a decision or is being
    decided), :class:`CorrectionsError` (bad decision, mask or note; nothing written) and
    ``FileNotFoundError`` (unknown item).
    """
    if decision not in DECISIONS:
        raise CorrectionsError(f"decision must be one of {DECISIONS}, not {decision!r}")
    if not user or not isinstance(user, str):
        raise CorrectionsError("a decision needs the user who made it")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise CorrectionsError(f"the note is longer than {MAX_NOTE_CHARS} characters")
    item = read_item(bucket_url, item_id, storage_options)
    if item["decision"] is not None:
        d = item["decision"]
        raise AlreadyDecided(f"item {item_id!r} was already {d['decision']} by {d['user']} at {d['at']}")

    qbase, dbase = queue_url(bucket_url, item_id), done_url(bucket_url, item_id)
    image_jpeg = storage.read_bytes(storage.join(qbase, "image.jpg"), storage_options)
    final_png: bytes | None = None
    if decision == "accepted":
        if mask_png is not None:
            raise CorrectionsError("'accepted' keeps the predicted mask: send a mask only with 'corrected'")
        if mask_source not in (None, "predicted"):
            raise CorrectionsError("'accepted' has mask_source 'predicted'")
        mask_source = "predicted"
        final_png = storage.read_bytes(storage.join(qbase, "mask.png"), storage_options)
        if not cv2.imdecode(np.frombuffer(final_png, np.uint8), cv2.IMREAD_GRAYSCALE).any():
            raise CorrectionsError("the predicted mask is empty: correct the item or reject it")
    elif decision == "corrected":
        if mask_png is None:
            raise CorrectionsError("'corrected' needs the corrected mask")
        mask_source = mask_source or "upload"
        if mask_source not in ("brush", "upload"):
            raise CorrectionsError(f"mask_source of a correction is 'brush' or 'upload', not {mask_source!r}")
        final_png = encode_png(binarise_mask(mask_png, _decode_image_size(image_jpeg)))
    else:
        if mask_png is not None:
            raise CorrectionsError("'rejected' takes no mask")
        mask_source = None

    record = {
        "item_id": item_id,
        "decision": decision,
        "user": user,
        "at": now_iso(),
        "mask_source": mask_source,
        "note": note or None,
    }
    token = _claim(bucket_url, item_id, user, storage_options)
    committed = False
    try:
        pair_meta_url = storage.join(pool_url(bucket_url, item_id), "meta.json")
        if final_png is not None:
            storage.write_bytes(storage.join(dbase, "mask.png"), final_png, storage_options)
            meta = PoolMeta(
                origin=decision, source_url=item["source_url"], score=item.get("score"),
                model_version=item.get("model_version", ""), user=user, at=record["at"], item_id=item_id,
                source_sha256=item.get("source_sha256", ""), extra={"batch": item["batch"], "stem": item["stem"], "mask_source": mask_source},
            )
            add_to_pool(bucket_url, item_id, image_jpeg, final_png, meta, storage_options, replace=True)
        elif _exists(pair_meta_url, storage_options):
            # Only after an interrupted earlier attempt on this item put a pair in the pool that was
            # never committed by a decision: a rejection must not leave it there.
            if _read_json(pair_meta_url, storage_options).get("item_id") == item_id:
                storage.remove(pair_meta_url, storage_options)
        try:
            storage.create_exclusive(storage.join(dbase, "decision.json"), _json_bytes(record), storage_options)
            committed = True
        except FileExistsError:
            d = read_decision(bucket_url, item_id, storage_options) or {}
            raise AlreadyDecided(f"item {item_id!r} was already {d.get('decision')} by {d.get('user')} "
                                 f"at {d.get('at')}") from None
    finally:
        if not committed:  # whatever failed, the item is free again at once (not locked for minutes)
            _release_claim(bucket_url, item_id, token, storage_options)
    return record


# ---------------------------------------------------------------- retraining pool


def add_to_pool(
    bucket_url: str,
    pair_id: str,
    image_jpeg: bytes,
    mask_png: bytes,
    meta: PoolMeta | dict,
    storage_options: dict | None = None,
    replace: bool = False,
) -> str:
    """Add an image/mask pair to the retraining pool; returns the pair's URL.

    Takes the pair id (the inference DAG should use :func:`make_item_id` of batch and stem, so a
    person's later decision on the same photo supersedes the prediction), the photo (JPEG), the
    mask (PNG, binarised to 0/255 here; must match the photo's size and not be empty) and a
    :class:`PoolMeta` (or a dict of its fields). Writes ``image.jpg``, ``mask.png`` and
    ``meta.json`` last.

    Pairs are not rewritten: when the pair already exists the call changes nothing (a retried
    task is harmless), except that a person's pair (``accepted`` / ``corrected``) replaces a
    ``published`` prediction. ``replace=True`` always writes (used by :func:`decide`).
    """
    if isinstance(meta, dict):
        known = {f for f in PoolMeta.__dataclass_fields__ if f != "extra"}
        meta = PoolMeta(**{k: v for k, v in meta.items() if k in known},
                        extra={**meta.get("extra", {}), **{k: v for k, v in meta.items() if k not in known | {"extra", "pair_id"}}})
    base = pool_url(bucket_url, pair_id)
    meta_url = storage.join(base, "meta.json")
    if not replace and _exists(meta_url, storage_options):
        existing = _read_json(meta_url, storage_options)
        if not (existing.get("origin") == "published" and meta.origin in HUMAN_ORIGINS):
            return base
    mask = binarise_mask(mask_png, _decode_image_size(image_jpeg))
    storage.write_bytes(storage.join(base, "image.jpg"), image_jpeg, storage_options)
    storage.write_bytes(storage.join(base, "mask.png"), encode_png(mask), storage_options)
    record = {"pair_id": pair_id, **{k: v for k, v in asdict(meta).items() if k != "extra"}, **meta.extra}
    storage.write_bytes(meta_url, _json_bytes(record), storage_options)
    return base


def list_pool(bucket_url: str, storage_options: dict | None = None, since: str | datetime | None = None) -> list[dict]:
    """List the retraining pool, oldest first (``at``, then ``pair_id``).

    Returns the ``meta.json`` dicts with ``image_url`` and ``mask_url`` added. ``since`` (an ISO
    timestamp or an aware datetime) keeps only pairs added strictly after it, so a consumer can
    pass the largest ``at`` it has already used.
    """
    if isinstance(since, datetime):
        since = since.astimezone(timezone.utc).isoformat(timespec="microseconds")
    threshold = datetime.fromisoformat(since) if since else None
    root = layout.retraining_pool(bucket_url)
    urls = [o.url for o in _list(root, storage_options) if o.relpath.count("/") == 1 and o.relpath.endswith("/meta.json")]
    out = []
    for url, data in storage.read_many(urls, storage_options).items():
        record = json.loads(data)
        if threshold is not None and datetime.fromisoformat(record["at"]) <= threshold:
            continue
        base = storage.join(root, record["pair_id"])
        record["image_url"] = storage.join(base, "image.jpg")
        record["mask_url"] = storage.join(base, "mask.png")
        out.append(record)
    return sorted(out, key=lambda r: (r["at"], r["pair_id"]))
