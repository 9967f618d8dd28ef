"""The reviewers' corrections to the proposed product clusters and flagged masks, and their application.

Clustering proposes a cluster (an integer) and a name per cluster. Reviewers move images between
clusters and rename clusters; every change is one new object
``review/<clustering>/corrections/<time>-<random>.json`` (who, when, what), where ``<clustering>``
identifies the proposal it was made against (a digest of ``clusters/assignments.parquet``): no
writer reads, extends and rewrites a shared log, so two reviewers on two api-server processes
cannot lose each other's work, and clustering the version again starts a new, empty log. The
review state is the proposal with its corrections replayed in name order. Approval closes the
review: :func:`apply_review` first writes ``review/<clustering>/closed.json``, after which
:func:`record_correction` refuses (:class:`ReviewClosed`, a 409 on the pages), then writes the
final product type of every clean pair into the manifest's ``cluster`` column. A Reject is recorded
(:func:`record_rejection`, ``rejected.json``) and leaves the review open for a new run. (A log from before
this layout, ``review/corrections.jsonl``, is replayed first.)

The mask audit flags implausible masks (the manifest's ``audit_reasons``). Reviewers answer each
flagged pair with a ``mask`` correction in the same log: ``keep`` (the mask is fine), ``exclude``
(leave the pair out of training and of the test split) or ``fix`` (a corrected mask uploaded with
:func:`save_fixed_mask`, stored as a file of its own under ``review/masks/``). The last answer for a pair wins;
:func:`apply_review` writes it into the manifest's ``audit_decision`` (and ``mask_url`` for a fix).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from tasks.core import layout, storage
from tasks.core.codecs import decode_mask_file
from tasks.data.config import MAX_FIXED_MASK_BYTES
from tasks.core.manifest import (
    AUDIT_EXCLUDE,
    AUDIT_FIXED,
    AUDIT_KEEP,
    STATUS_OK,
    audit_flagged,
    read_table,
    write_table,
)

LEGACY_CORRECTIONS_PATH = "review/corrections.jsonl"
ASSIGNMENTS_PATH = "clusters/assignments.parquet"
#: In ``review/<clustering>/``: the last Reject of the review's gate (:func:`record_rejection`).
REJECTED_FILE = "rejected.json"
FINAL_PATH = "clusters/final.parquet"
FIXED_MASKS_PATH = "review/masks"
#: A reviewer's answers to a flagged mask (the ``decision`` of a ``mask`` correction).
MASK_DECISIONS = ("keep", "exclude", "fix")
#: ``mask`` decision -> the manifest's ``audit_decision``.
_AUDIT_DECISION = {"keep": AUDIT_KEEP, "exclude": AUDIT_EXCLUDE, "fix": AUDIT_FIXED}
#: Largest corrected mask file accepted by :func:`save_fixed_mask`.
_NAME_PATTERN = re.compile(r"^[\w][\w &/+.,'()-]{0,59}$")
#: Correction objects already read by this process (URL → correction): they are never rewritten, so
#: a page load lists the log and fetches only what is new.
_stored_corrections: dict[str, "Correction"] = {}
_CACHE_LIMIT = 200_000
#: Correction objects are named from their writer's clock just before they are stored, so each
#: becomes visible within seconds of the time in its name. A process that listed a review's log
#: before lists again only the names from this many seconds before the latest it knows (S3
#: ``StartAfter``): a page load costs what is new, not the log's length. A correction whose save
#: took half this long is withdrawn (:func:`_store_correction`), so none can fall behind the window.
LISTING_WINDOW_S = 300.0
_NAME_TIME_FORMAT = "%Y%m%dT%H%M%S%f"
#: Folder URL -> the correction object names this process listed there, sorted.
_listed_names: dict[str, list[str]] = {}


class CorrectionError(ValueError):
    """A correction that cannot be applied (unknown image or cluster, bad name, unfit mask)."""


class ReviewClosed(RuntimeError):
    """The review was approved and applied: later corrections would never be used."""


@dataclass(frozen=True)
class Correction:
    """One reviewer action: ``move`` an image to a cluster, ``rename`` a cluster, or answer a
    flagged ``mask`` with a ``decision`` (``keep``, ``exclude`` or ``fix``)."""

    action: str
    user: str
    at: str
    key: str | None = None
    to_cluster: int | None = None
    cluster: int | None = None
    name: str | None = None
    decision: str | None = None
    #: A ``fix``'s uploaded mask: its file name under ``review/masks/`` (each upload a file of its own).
    mask_file: str | None = None

    def to_json(self) -> str:
        """The correction as one line of JSON (its stored object)."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


@dataclass
class ReviewState:
    """Clusters as the reviewers currently see them.

    ``cluster_of`` maps each image key to its cluster; ``names`` each cluster to its name;
    ``stems`` each key to its original stem; ``proposed`` the clustering's original assignment.
    ``flagged`` maps each clean key whose mask the audit flagged to its reason codes;
    ``sizes_of`` such a key to the clean pair's ``(width, height)`` (when the manifest has it);
    ``mask_decisions`` a flagged key to the reviewers' last answer (``keep``/``exclude``/``fix``).
    """

    cluster_of: dict[str, int]
    names: dict[int, str]
    stems: dict[str, str]
    proposed: dict[str, int]
    proposed_names: dict[int, str] = field(default_factory=dict)
    corrections: list[Correction] = field(default_factory=list)
    flagged: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sizes_of: dict[str, tuple[int, int]] = field(default_factory=dict)
    mask_decisions: dict[str, str] = field(default_factory=dict)
    #: A fixed key -> the file name (under ``review/masks/``) of the upload its last ``fix`` chose.
    fixed_masks: dict[str, str] = field(default_factory=dict)
    #: The proposal the corrections belong to (see the module docstring).
    clustering: str = ""
    #: Stored corrections that no longer fit when replayed, with the reason: two reviewers changed
    #: the same thing at once (e.g. gave two clusters one name); the one saved first wins.
    conflicts: list[tuple[Correction, str]] = field(default_factory=list)
    #: The names of the correction objects this state was replayed from, in order.
    read_objects: list[str] = field(default_factory=list)
    #: The review was approved and applied (:func:`is_closed`): the pages show it and take no change.
    closed: bool = False
    #: The last Reject of this proposal's gate (:func:`record_rejection`: ``{"by", "at"}``), or None. The
    #: review stays open: a new run of the batch asks again.
    rejected: dict | None = None

    def proposal(self) -> "ReviewState":
        """The same proposal with no correction applied (nothing read again)."""
        return ReviewState(cluster_of=dict(self.proposed), names=dict(self.proposed_names), stems=self.stems,
                           proposed=self.proposed, proposed_names=self.proposed_names, flagged=self.flagged,
                           sizes_of=self.sizes_of, clustering=self.clustering, closed=self.closed,
                           rejected=self.rejected)

    def members(self, cluster: int) -> list[str]:
        """Keys in ``cluster``, sorted."""
        return sorted(k for k, c in self.cluster_of.items() if c == cluster)

    def sizes(self) -> dict[int, int]:
        """Number of images per cluster (every cluster listed, also an emptied one)."""
        counts = {c: 0 for c in self.names}
        for c in self.cluster_of.values():
            counts[c] += 1
        return counts

    def moved(self) -> dict[str, tuple[int, int]]:
        """Keys whose cluster differs from the proposal: ``key -> (proposed, now)``."""
        return {k: (self.proposed[k], c) for k, c in self.cluster_of.items() if self.proposed[k] != c}

    def flagged_pairs(self) -> list[dict]:
        """The flagged pairs for the masks page, sorted by key: ``key``, ``stem``, ``reasons``,
        ``cluster``, ``cluster_name``, ``size`` (the clean pair's ``"W×H"``, "" when unknown),
        ``decision`` ("" while undecided), ``fixed_file`` (a fix's chosen upload under ``review/masks/``,
        else "") and who decided when."""
        last = {c.key: c for c in self.corrections if c.action == "mask"}
        pairs = []
        for key in sorted(self.flagged):
            cluster = self.cluster_of.get(key)
            decided = last.get(key)
            pairs.append({
                "key": key,
                "stem": self.stems.get(key, key),
                "reasons": list(self.flagged[key]),
                "cluster": cluster,
                "cluster_name": self.names.get(cluster, "") if cluster is not None else "",
                "size": "{}×{}".format(*self.sizes_of[key]) if key in self.sizes_of else "",
                "decision": self.mask_decisions.get(key, ""),
                "fixed_file": self.fixed_masks.get(key, "") if self.mask_decisions.get(key) == "fix" else "",
                "decided_by": decided.user if decided else "",
                "decided_at": decided.at if decided else "",
            })
        return pairs

    def check_flagged(self, key: str | None) -> None:
        """Raise :class:`CorrectionError` unless the audit flagged the mask of ``key``."""
        if key not in self.flagged:
            if key in self.cluster_of:
                raise CorrectionError(f"the mask of {key!r} is not flagged by the audit: nothing to decide")
            raise CorrectionError(f"unknown image key {key!r}")

    def apply(self, correction: Correction) -> None:
        """Apply one correction in place; raises :class:`CorrectionError` when it does not fit."""
        if correction.action == "mask":
            self.check_flagged(correction.key)
            if correction.decision not in MASK_DECISIONS:
                raise CorrectionError(f"mask decision {correction.decision!r} must be one of {list(MASK_DECISIONS)}")
            self.mask_decisions[correction.key] = correction.decision
            if correction.decision == "fix":  # a log from before one file per upload names none
                self.fixed_masks[correction.key] = correction.mask_file or f"{correction.key}.png"
        elif correction.action == "move":
            if correction.key not in self.cluster_of:
                raise CorrectionError(f"unknown image key {correction.key!r}")
            if correction.to_cluster not in self.names:
                raise CorrectionError(f"unknown cluster {correction.to_cluster!r}; clusters are {sorted(self.names)}")
            self.cluster_of[correction.key] = int(correction.to_cluster)
        elif correction.action == "rename":
            if correction.cluster not in self.names:
                raise CorrectionError(f"unknown cluster {correction.cluster!r}; clusters are {sorted(self.names)}")
            name = (correction.name or "").strip()
            if not _NAME_PATTERN.match(name):
                raise CorrectionError(
                    f"cluster name {correction.name!r} must be 1-60 characters: letters, digits, spaces and &/+.,'()-"
                )
            taken = {n for c, n in self.names.items() if c != correction.cluster}
            if name in taken:
                raise CorrectionError(f"another cluster is already named {name!r}")
            self.names[int(correction.cluster)] = name
        else:
            raise CorrectionError(f"unknown action {correction.action!r}: use 'move', 'rename' or 'mask'")
        self.corrections.append(correction)


def _read_assignments(dataset_url: str, storage_options: dict | None) -> bytes:
    """The bytes of ``clusters/assignments.parquet``; ``FileNotFoundError`` before clustering."""
    url = storage.join(dataset_url, ASSIGNMENTS_PATH)
    try:
        return storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist: the dataset has not been clustered yet") from None


def _clustering_id(assignments: bytes) -> str:
    """The proposal's identity: a digest of ``clusters/assignments.parquet``'s bytes."""
    return "clustering-" + hashlib.sha256(assignments).hexdigest()[:16]


def review_log_url(dataset_url: str, clustering: str) -> str:
    """The folder of one proposal's review: ``review/<clustering>`` (corrections/, closed.json)."""
    return storage.join(layout.review(dataset_url), clustering)


def read_corrections(dataset_url: str, storage_options: dict | None = None) -> list[Correction]:
    """The corrections of the current proposal, in the order they are replayed."""
    clustering = _current_clustering(dataset_url, storage_options)
    return [c for _, c in _read_corrections(dataset_url, clustering, storage_options)]


def _read_corrections(dataset_url: str, clustering: str,
                      storage_options: dict | None) -> list[tuple[str, Correction]]:
    """The legacy log's lines, then the proposal's correction objects in name (time) order, each
    with its object's name (``legacy:<line>`` for the legacy log)."""
    lines: list[str] = []
    legacy = storage.join(dataset_url, LEGACY_CORRECTIONS_PATH)
    if storage.exists(legacy, storage_options):
        lines += storage.read_bytes(legacy, storage_options).decode("utf-8").splitlines()
    folder = storage.join(review_log_url(dataset_url, clustering), "corrections")
    urls = [storage.join(folder, name) for name in _list_log(folder, storage_options) if name.endswith(".json")]
    missing = [url for url in urls if url not in _stored_corrections]
    found = storage.read_many(missing, storage_options)
    for url, data in found.items():  # objects never change: read once
        if len(_stored_corrections) >= _CACHE_LIMIT:
            _stored_corrections.clear()
        _stored_corrections[url] = Correction(**json.loads(data))
    if len(found) < len(missing):  # withdrawn since they were listed
        gone = {posixpath.basename(url) for url in missing if url not in found}
        _listed_names[folder] = [n for n in _listed_names.get(folder, []) if n not in gone]
    legacy = [(f"legacy:{i}", Correction(**json.loads(line))) for i, line in enumerate(lines) if line.strip()]
    return legacy + [(posixpath.basename(url), _stored_corrections[url]) for url in urls if url in _stored_corrections]


def _list_log(folder: str, storage_options: dict | None) -> list[str]:
    """The object names in a review's ``corrections/`` folder, sorted: this process's earlier listing up
    to :data:`LISTING_WINDOW_S` before its latest name, and a fresh listing from there."""
    known = _listed_names.get(folder)
    after = _window_start(known[-1]) if known else ""
    names = [n for n in known if n <= after] if after else []
    names += storage.list_names_after(folder, after, storage_options)
    if sum(map(len, _listed_names.values())) >= _CACHE_LIMIT:
        _listed_names.clear()
    _listed_names[folder] = names
    return names


def _window_start(name: str) -> str:
    """The name prefix :data:`LISTING_WINDOW_S` before the time in a correction object's name ("" for
    a name without one: list everything)."""
    try:
        named_at = datetime.strptime(name[:21], _NAME_TIME_FORMAT)
    except ValueError:
        return ""
    return (named_at - timedelta(seconds=LISTING_WINDOW_S)).strftime(_NAME_TIME_FORMAT)


def _read_flags(dataset_url: str, storage_options: dict | None) -> tuple[dict, dict]:
    """``(key -> reason codes, key -> (width, height))`` of the flagged clean pairs in the manifest
    (empty for a dataset without a manifest or without the audit columns)."""
    url = layout.manifest(dataset_url)
    if not storage.exists(url, storage_options):
        return {}, {}
    manifest = read_table(url, storage_options)
    rows = manifest[manifest["status"].eq(STATUS_OK).fillna(False).astype(bool) & audit_flagged(manifest)]
    flagged, sizes = {}, {}
    for row in rows.to_dict("records"):
        key = str(row["key"])
        flagged[key] = tuple(code for code in str(row["audit_reasons"]).split(",") if code)
        if not pd.isna(row.get("width")) and not pd.isna(row.get("height")):
            sizes[key] = (int(row["width"]), int(row["height"]))
    return flagged, sizes


def fixed_mask_url(dataset_url: str, key: str, file_name: str | None = None) -> str:
    """Where a reviewer's corrected mask of ``key`` is stored: ``review/masks/<file_name>`` (an upload's
    own file, :func:`save_fixed_mask`), or ``review/masks/<key>.png`` (a fix saved before that)."""
    return storage.join(dataset_url, FIXED_MASKS_PATH, file_name or f"{key}.png")


def load_review_state(dataset_url: str, storage_options: dict | None = None) -> ReviewState:
    """Read the proposed clusters and replay every saved correction; returns the :class:`ReviewState`.

    Raises ``FileNotFoundError`` when the dataset has not been clustered yet.
    """
    return _state_of(dataset_url, _read_assignments(dataset_url, storage_options), storage_options)


def _state_of(dataset_url: str, assignments: bytes, storage_options: dict | None,
              closed: bool | None = None) -> ReviewState:
    """The proposal in ``assignments`` (the parquet file's bytes) with its corrections replayed;
    ``closed`` when the caller knows it (else :func:`is_closed` is asked)."""
    table = pd.read_parquet(io.BytesIO(assignments))
    proposed = {str(k): int(c) for k, c in zip(table["key"], table["cluster"], strict=True)}
    names = {int(c): str(n) for c, n in table.groupby("cluster")["proposed_name"].first().items()}
    flagged, sizes_of = _read_flags(dataset_url, storage_options)
    clustering = _clustering_id(assignments)
    proposal = ReviewState(
        cluster_of=dict(proposed),
        names=dict(names),
        stems=dict(zip(table["key"].astype(str), table["stem"].astype(str), strict=True)),
        proposed=proposed,
        proposed_names=names,
        flagged=flagged,
        sizes_of=sizes_of,
        clustering=clustering,
        closed=is_closed(dataset_url, clustering, storage_options) if closed is None else closed,
        rejected=read_rejection(dataset_url, clustering, storage_options),
    )
    return _replayed(dataset_url, proposal, storage_options)


def _replayed(dataset_url: str, state: ReviewState, storage_options: dict | None) -> ReviewState:
    """``state`` (a proposal, changed in place) with its review's stored corrections replayed."""
    for name, correction in _read_corrections(dataset_url, state.clustering, storage_options):
        state.read_objects.append(name)
        try:
            state.apply(correction)
        except CorrectionError as exc:  # saved concurrently with one it contradicts: skipped, the review goes on
            state.conflicts.append((correction, str(exc)))
    return state


def record_correction(
    dataset_url: str,
    action: str,
    user: str,
    storage_options: dict | None = None,
    **fields,
) -> ReviewState:
    """Validate a reviewer's action against the current state and store it as a new object.

    Takes the dataset URL, ``action`` (``move`` with ``key`` and ``to_cluster``, ``rename`` with
    ``cluster`` and ``name``, or ``mask`` with ``key`` and ``decision``) and the reviewer's user name.
    A ``mask`` decision needs a flagged key; ``fix`` also needs the corrected mask already saved
    (use :func:`save_fixed_mask`). Returns the new state; raises :class:`CorrectionError` for an
    action that does not fit and :class:`ReviewClosed` after approval (nothing is written then).
    """
    state = load_review_state(dataset_url, storage_options)
    if state.closed:
        raise ReviewClosed("the review was approved and applied: this change would never be used")
    return _store_correction(dataset_url, state, action, user, storage_options, **fields)


def _store_correction(
    dataset_url: str, state: ReviewState, action: str, user: str, storage_options: dict | None, **fields
) -> ReviewState:
    """Apply a new correction to ``state`` (validating it), store it as a new object and return the
    state replayed from the log. Raises :class:`CorrectionError` when the replay skips it: another
    reviewer's contradicting change was saved first (the stored object stays, skipped on every replay);
    :class:`ReviewClosed` when the review was closed meanwhile and :func:`apply_review` did not read
    this object (it is removed again). ``apply_review`` closes, reads the log and records what it read
    (``applied.json``), so a change answered without an error is applied and one refused is not."""
    now = datetime.now(timezone.utc)
    correction = Correction(action=action, user=user, at=now.isoformat(timespec="seconds"), **fields)
    state.apply(correction)
    if correction.decision == "fix" and not storage.exists(
            fixed_mask_url(dataset_url, correction.key, correction.mask_file), storage_options):
        raise CorrectionError(f"no corrected mask was uploaded for {correction.key!r}: upload one to fix it")
    name = f"{now.strftime(_NAME_TIME_FORMAT)}-{uuid.uuid4().hex[:12]}.json"
    url = storage.join(review_log_url(dataset_url, state.clustering), "corrections", name)
    storage.create_exclusive(url, correction.to_json().encode("utf-8"), storage_options)  # never overwrites one
    if (datetime.now(timezone.utc) - now).total_seconds() > LISTING_WINDOW_S / 2:  # see LISTING_WINDOW_S
        storage.remove(url, storage_options)
        raise CorrectionError("saving the change took too long and it was withdrawn: please make it again")
    if is_closed(dataset_url, state.clustering, storage_options) and not _was_applied(
            dataset_url, state.clustering, name, storage_options):  # approved while this was being saved
        storage.remove(url, storage_options)
        raise ReviewClosed("the review was approved while this change was being saved: it was not kept")
    replayed = _replayed(dataset_url, state.proposal(), storage_options)  # the log may have grown meanwhile
    for skipped, reason in replayed.conflicts:
        if skipped == correction:
            raise CorrectionError(f"{reason} (another reviewer's change was saved first)")
    return replayed


#: How long a change saved while the review closes waits for ``applied.json`` (apply_review writes it
#: right after reading the log).
APPLIED_WAIT_S = 60.0


def _was_applied(dataset_url: str, clustering: str, name: str, storage_options: dict | None) -> bool:
    """Whether :func:`apply_review` read the correction object ``name`` (its ``applied.json``; waits
    for it up to :data:`APPLIED_WAIT_S`, then says no)."""
    url = storage.join(review_log_url(dataset_url, clustering), "applied.json")
    deadline = time.monotonic() + APPLIED_WAIT_S
    while True:
        try:
            return name in json.loads(storage.read_bytes(url, storage_options))["objects"]
        except FileNotFoundError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def is_closed(dataset_url: str, clustering: str, storage_options: dict | None = None) -> bool:
    """Whether the review of this proposal was approved and applied (:func:`apply_review`)."""
    return storage.exists(storage.join(review_log_url(dataset_url, clustering), "closed.json"), storage_options)


def _current_clustering(dataset_url: str, storage_options: dict | None) -> str:
    """The id of the proposal under review (a digest of its assignments); ``FileNotFoundError`` before clustering."""
    return _clustering_id(_read_assignments(dataset_url, storage_options))


def record_rejection(dataset_url: str, by: str | None, storage_options: dict | None = None) -> dict:
    """Record that the gate of the current proposal's review was answered Reject (by a reviewer, or
    by its timeout when ``by`` is None): ``review/<clustering>/rejected.json``, the last one kept.
    The review stays open for a new run of the batch. Returns what was written (``{"by", "at"}``)."""
    clustering = _current_clustering(dataset_url, storage_options)
    answer = {"by": by or "the review's timeout", "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    storage.write_text(storage.join(review_log_url(dataset_url, clustering), REJECTED_FILE), json.dumps(answer),
                       storage_options)
    return answer


def clear_rejection(dataset_url: str, storage_options: dict | None = None) -> None:
    """Forget the last Reject of the current proposal's review (a new run's gate asks again)."""
    clustering = _current_clustering(dataset_url, storage_options)
    url = storage.join(review_log_url(dataset_url, clustering), REJECTED_FILE)
    if storage.exists(url, storage_options):
        storage.remove(url, storage_options)


def read_rejection(dataset_url: str, clustering: str, storage_options: dict | None = None) -> dict | None:
    """The last :func:`record_rejection` of this proposal, or None."""
    url = storage.join(review_log_url(dataset_url, clustering), REJECTED_FILE)
    try:
        return json.loads(storage.read_bytes(url, storage_options))
    except FileNotFoundError:
        return None


def review_status(dataset_url: str, storage_options: dict | None = None) -> str:
    """Where a dataset version's review stands: ``"no clusters"`` (not clustered yet), ``"approved"``,
    ``"rejected"`` (its gate's last answer; a new run asks again) or ``"waiting"``."""
    try:
        clustering = _current_clustering(dataset_url, storage_options)
    except FileNotFoundError:
        return "no clusters"
    if is_closed(dataset_url, clustering, storage_options):
        return "approved"
    return "rejected" if read_rejection(dataset_url, clustering, storage_options) else "waiting"


def _mask_array(png_bytes: bytes, size: tuple[int, int]) -> np.ndarray:
    """Check an uploaded mask's format and size from its header, then decode it to 0/255."""
    try:
        return decode_mask_file(png_bytes, size, MAX_FIXED_MASK_BYTES, reference="the clean pair", shrink_to_fit=True)
    except ValueError as exc:
        raise CorrectionError(str(exc)) from None


def save_fixed_mask(
    dataset_url: str, key: str, png_bytes: bytes, user: str, storage_options: dict | None = None
) -> ReviewState:
    """Store a reviewer's corrected mask for a flagged pair and record the ``fix`` decision.

    The upload must be a PNG (at most :data:`MAX_FIXED_MASK_BYTES`) of the clean pair's width ×
    height from the manifest, or of the full-size photo's (larger, the same aspect ratio: it is
    shrunk by coverage as cleaning shrank the pair); both are checked from the file's header before
    any pixel is decoded. It is decoded as greyscale (a not fully opaque alpha channel is the mask), thresholded
    at 128 to 0/255 and written to a file of its own, ``review/masks/<key>-<upload id>.png``, that the
    ``fix`` correction names: an upload refused after it was written (the review closed meanwhile),
    or one made against a later clustering, never replaces the mask an approved review chose. The
    clean mask and the inputs are never touched. Returns the new state; raises :class:`CorrectionError`
    for an unknown or unflagged key and for a file that does not fit (nothing is written then).
    """
    import cv2

    state = load_review_state(dataset_url, storage_options)
    if state.closed:
        raise ReviewClosed("the review was approved and applied: this fix would never be used")
    state.check_flagged(key)
    if key not in state.sizes_of:
        raise CorrectionError(f"the manifest has no width/height for {key!r}: cannot check the mask's size")
    mask = _mask_array(png_bytes, state.sizes_of[key])
    if not mask.any():
        raise CorrectionError("the mask is empty (no foreground pixel): choose Exclude instead")
    ok, encoded = cv2.imencode(".png", mask)
    if not ok:
        raise CorrectionError("PNG encoding failed")
    file_name = f"{key}-{uuid.uuid4().hex[:12]}.png"
    storage.create_exclusive(fixed_mask_url(dataset_url, key, file_name), encoded.tobytes(), storage_options)
    return _store_correction(dataset_url, state, "mask", user, storage_options, key=key, decision="fix",
                             mask_file=file_name)


def _apply_mask_decisions(manifest: pd.DataFrame, state: ReviewState, dataset_url: str) -> dict:
    """Write ``audit_decision`` (and ``mask_url`` of fixed pairs) of the flagged clean rows in place;
    returns the counts. Rows that are not flagged are left as they are."""
    flagged = manifest["status"].eq(STATUS_OK).fillna(False).astype(bool) & audit_flagged(manifest)
    if "audit_decision" not in manifest:
        manifest["audit_decision"] = pd.Series(pd.NA, index=manifest.index, dtype="string")
    manifest["audit_decision"] = manifest["audit_decision"].astype("string")
    counts = dict.fromkeys(("kept", "excluded", "fixed", "undecided"), 0)
    label = {"keep": "kept", "exclude": "excluded", "fix": "fixed"}
    for index in manifest.index[flagged]:
        key = str(manifest.at[index, "key"])
        decision = state.mask_decisions.get(key, "")
        manifest.at[index, "audit_decision"] = _AUDIT_DECISION.get(decision, "")
        counts[label.get(decision, "undecided")] += 1
        if decision == "fix":
            manifest.at[index, "mask_url"] = fixed_mask_url(dataset_url, key, state.fixed_masks.get(key))
        elif str(manifest.at[index, "mask_url"]).startswith(storage.join(dataset_url, FIXED_MASKS_PATH) + "/"):
            from tasks.data.ingest import clean_urls  # an earlier fix was taken back

            manifest.at[index, "mask_url"] = clean_urls(dataset_url, key)[1]
    return {"flagged": int(flagged.sum()), **counts}


def apply_review(dataset_url: str, storage_options: dict | None = None) -> dict:
    """Write the reviewed product type of every clean pair into ``manifest.parquet``.

    Also writes the reviewers' answer to every flagged mask into ``audit_decision`` (``keep``,
    ``exclude``, ``fixed`` with ``mask_url`` pointing at the chosen upload under ``review/masks/``, or "" while
    undecided: such pairs stay out of training) and ``clusters/final.parquet`` (stem, key,
    proposed cluster, final cluster, final name). Manifests without the audit columns get no
    ``audit_decision`` column. Returns ``{"sizes": {name: n}, "moved": n, "renamed": n,
    "corrections": n, "masks": {"flagged", "kept", "excluded", "fixed", "undecided"}, "manifest_url"}``.
    Closes the review first (``closed.json``), so that no correction arrives after it was read.
    """
    assignments = _read_assignments(dataset_url, storage_options)
    closed = storage.join(review_log_url(dataset_url, _clustering_id(assignments)), "closed.json")
    if not storage.exists(closed, storage_options):
        storage.write_text(closed, json.dumps({"at": datetime.now(timezone.utc).isoformat(timespec="seconds")}),
                           storage_options)
    state = _state_of(dataset_url, assignments, storage_options, closed=True)
    storage.write_text(storage.join(review_log_url(dataset_url, state.clustering), "applied.json"),
                       json.dumps({"objects": state.read_objects}), storage_options)
    manifest_url = layout.manifest(dataset_url)
    manifest = read_table(manifest_url, storage_options)
    final_name = {key: state.names[c] for key, c in state.cluster_of.items()}
    ok = manifest["status"] == STATUS_OK
    missing = sorted(set(manifest.loc[ok, "key"]) - set(final_name))
    if missing:
        raise CorrectionError(f"{len(missing)} clean pairs have no cluster (e.g. {missing[:3]}); re-run clustering")
    manifest["cluster"] = manifest["cluster"].astype("string")
    manifest.loc[ok, "cluster"] = manifest.loc[ok, "key"].map(final_name)
    masks = dict.fromkeys(("flagged", "kept", "excluded", "fixed", "undecided"), 0)
    if "audit_reasons" in manifest:
        masks = _apply_mask_decisions(manifest, state, dataset_url)
    write_table(manifest, manifest_url, storage_options)

    final = pd.DataFrame(
        {
            "stem": [state.stems[k] for k in state.cluster_of],
            "key": list(state.cluster_of),
            "proposed_cluster": [state.proposed[k] for k in state.cluster_of],
            "cluster": list(state.cluster_of.values()),
            "name": [final_name[k] for k in state.cluster_of],
        }
    )
    write_table(final, storage.join(dataset_url, FINAL_PATH), storage_options)
    renamed = len({c.cluster for c in state.corrections if c.action == "rename"})
    sizes = final["name"].value_counts().sort_index()
    return {
        "sizes": {str(k): int(v) for k, v in sizes.items()},
        "moved": len(state.moved()),
        "renamed": renamed,
        "corrections": len(state.corrections),
        "masks": masks,
        "manifest_url": manifest_url,
    }


def mask_review_summary(dataset_url: str, storage_options: dict | None = None) -> dict:
    """What the review gate tells about flagged masks (small and JSON-ready).

    ``{"flagged": n, "reasons": {code: n} (most frequent first; a pair may have several),
    "decided": {"keep": n, "exclude": n, "fix": n}, "undecided": n}``. Needs the clustered dataset.
    """
    state = load_review_state(dataset_url, storage_options)
    reasons = Counter(code for codes in state.flagged.values() for code in codes)
    decided = Counter(state.mask_decisions.values())
    return {
        "flagged": len(state.flagged),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "decided": {d: int(decided.get(d, 0)) for d in MASK_DECISIONS},
        "undecided": len(state.flagged) - len(state.mask_decisions),
    }


def thumbnail_jpeg(image_bytes: bytes, mask_bytes: bytes, size: int = 160, overlay: bool = False) -> bytes:
    """A JPEG thumbnail of a clean pair with the mask outline drawn on it (for review pages).

    With ``overlay`` the background (outside the mask) is tinted and every contour is drawn,
    holes and specks included, so a flagged mask's faults show.
    """
    import cv2

    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    mask = cv2.imdecode(np.frombuffer(mask_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or mask is None:
        raise ValueError("clean pair does not decode")
    scale = size / max(image.shape[:2])
    dims = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.resize(image, dims, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, dims, interpolation=cv2.INTER_NEAREST)
    if overlay:
        outside = mask <= 127
        image[outside] = (0.45 * image[outside] + 0.55 * np.array([255, 0, 255])).astype(np.uint8)
    mode = cv2.RETR_LIST if overlay else cv2.RETR_EXTERNAL
    contours, _ = cv2.findContours((mask > 127).astype(np.uint8), mode, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, (255, 0, 255), 1, lineType=cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("thumbnail encoding failed")
    return buf.tobytes()
