"""Ingest stage: a studio batch in ``raw/<batch>/`` becomes a cleaned dataset version.

Three steps, each a plain function the DAG maps or chains:

1. :func:`plan_batch` lists the batch, pairs images with masks, fixes the dataset version and
   writes shard lists (Parquet) so that only URLs travel between tasks;
2. :func:`clean_shard` cleans one shard, pair by pair, writing clean pairs and a result table;
3. :func:`finalize_dataset` merges the shard results, collapses duplicate content and writes
   ``manifest.parquet``, ``quarantine.parquet`` and ``summary.json``.

Layout under ``datasets/<version>/``: ``clean/images/<key>.jpg``, ``clean/masks/<key>.png``,
``manifest.parquet``, ``quarantine.parquet``, ``summary.json``, and ``_work/`` for the plan and the
shard results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from tasks.data.mask_audit import audit_pair
from tasks.core import layout, storage
from tasks.core.heap import keep_freed_memory
from tasks.core.shards import PAIRS_PER_SHARD, check_shard_size, shard_ranges
from tasks.data.cleaning import (
    CLEANING_REVISION, CleanPair, CleaningConfig, Reason, Rejected, clean_pair, encode_clean_pair, pair_files, safe_stem, sha256,
)
from tasks.core.manifest import (
    AUDIT_FIXED,
    MANIFEST_COLUMNS,
    QUARANTINE_COLUMNS,
    STATUS_OK,
    STATUS_QUARANTINED,
    dataset_version,
    conform,
    read_table,
    to_frame,
    write_table,
    audit_flagged,
)

log = logging.getLogger(__name__)

SHARD_COLUMNS = ("stem", "key", "image_source", "mask_source")

#: A model's foreground probability (float ``H×W`` in [0, 1]) for an RGB ``uint8`` image.
Predict = Callable[[np.ndarray], np.ndarray]


def existing_dataset(bucket_url: str, version: str, storage_options: dict | None = None) -> dict:
    """The ``reuse_dataset`` stage: an existing dataset version to train on again (its splits kept).

    Returns ``{"version", "dataset_url"}`` like :func:`finalize_dataset`'s summary; raises
    ``ValueError`` when the version has no manifest.
    """
    version = version.strip()
    dataset_url = layout.dataset(bucket_url, version)
    if not storage.exists(layout.manifest(dataset_url), storage_options):
        raise ValueError(f"dataset version {version!r} has no manifest at {layout.manifest(dataset_url)}")
    print(f"retraining on the existing dataset version {version}; its splits are kept")
    return {"version": version, "dataset_url": dataset_url}


def plan_batch(
    bucket_url: str,
    batch: str,
    config: CleaningConfig,
    shard_size: int = PAIRS_PER_SHARD,
    storage_options: dict | None = None,
    max_shards: int | None = None,
) -> dict:
    """List ``raw/<batch>/``, pair its files and write the shard lists of a dataset version.

    Takes the bucket URL (``s3://bucket`` or a local folder), the batch name, the cleaning config
    and the number of pairs per shard (grown when more than ``max_shards`` shards would be needed,
    see :func:`tasks.core.shards.shard_ranges`). Returns ``{"version", "dataset_url", "batch", "shard_urls",
    "listing_rejects_url", "n_files", "n_pairs", "n_listing_rejects"}``.
    Raises ``FileNotFoundError`` when the batch holds no files.
    """
    check_shard_size(shard_size, max_shards)
    raw_url = layout.raw_batch(bucket_url, batch)
    objects = [o for o in storage.list_objects(raw_url, storage_options) if o.relpath.startswith(("images/", "masks/"))]
    if not objects:
        raise FileNotFoundError(f"no images/ or masks/ files under {raw_url}")
    by_relpath = {o.relpath: o for o in objects}
    pairing = pair_files(list(by_relpath))
    # A local file has no ETag: its time written stands in, so a file changed at the same size is a new version.
    version = dataset_version(batch, [(o.relpath, o.size, o.etag or o.modified) for o in objects],
                              {**config.to_dict(), "cleaning_revision": CLEANING_REVISION})
    dataset_url = layout.dataset(bucket_url, version)
    work_url = storage.join(dataset_url, "_work")

    def source(relpath: str | None) -> str | None:
        return by_relpath[relpath].url if relpath else None

    rejects = [
        {
            "stem": r["stem"],
            "key": safe_stem(r["stem"]),
            "batch": batch,
            "image_source": source(r["image_relpath"]),
            "mask_source": source(r["mask_relpath"]),
            "status": STATUS_QUARANTINED,
            "reason": r["reason"],
            "detail": r["detail"],
        }
        for r in pairing.rejects
    ]
    rejects_url = write_table(to_frame(rejects, MANIFEST_COLUMNS), storage.join(work_url, "listing_rejects.parquet"), storage_options)

    shard_urls = []
    pairs = pairing.pairs
    for index, (start, stop) in enumerate(shard_ranges(len(pairs), shard_size, max_shards)):
        rows = [
            {
                "stem": p["stem"],
                "key": safe_stem(p["stem"]),
                "image_source": source(p["image_relpath"]),
                "mask_source": source(p["mask_relpath"]),
            }
            for p in pairs[start:stop]
        ]
        url = storage.join(work_url, "shards", f"shard-{index:05d}.parquet")
        shard_urls.append(write_table(to_frame(rows, SHARD_COLUMNS), url, storage_options))
    log.info("batch %s: %d files, %d pairs in %d shards, %d rejected while pairing; version %s",
             batch, len(objects), len(pairs), len(shard_urls), len(rejects), version)
    return {
        "version": version,
        "dataset_url": dataset_url,
        "batch": batch,
        "shard_urls": shard_urls,
        "listing_rejects_url": rejects_url,
        "n_files": len(objects),
        "n_pairs": len(pairs),
        "n_listing_rejects": len(rejects),
    }


def clean_urls(dataset_url: str, key: str) -> tuple[str, str]:
    """URLs of a clean pair inside a dataset version: ``(image .jpg, mask .png)``."""
    return (
        storage.join(layout.clean(dataset_url), "images", f"{key}.jpg"),
        storage.join(layout.clean(dataset_url), "masks", f"{key}.png"),
    )


def _audit_reasons(pair, config: CleaningConfig, predict: Predict | None) -> tuple[str, ...]:
    if not config.audit_masks:
        return ()
    probability = None
    if predict is not None:
        try:
            probability = predict(pair.image)
        except Exception:  # the model check is optional: without it the structural checks still run
            log.exception("mask audit: the model failed on one image; audited without its check")
    return audit_pair(pair.image, pair.mask, probability=probability).reasons


@dataclass(frozen=True)
class ReadAndCleaned:
    """One pair read from storage and cleaned in memory: its manifest row and, when clean, its files."""

    #: Provenance, hashes and either the clean columns (``status`` ok) or the quarantine reason.
    row: dict
    #: The cleaned pair (None when quarantined).
    pair: CleanPair | None = None
    #: The clean image (JPEG) and mask (PNG), encoded for the dataset (None when quarantined).
    image_data: bytes | None = None
    mask_data: bytes | None = None


def read_and_clean(row: dict, config: CleaningConfig, storage_options: dict | None = None) -> ReadAndCleaned:
    """Read ``row``'s ``image_source``/``mask_source``, clean and encode the pair; raises only when the
    storage fails (not :data:`tasks.core.storage.OBJECT_ERRORS`: the task's retry redoes the shard).

    ``row`` holds the provenance columns (``stem``, ``key``, ``batch``, ``image_source``,
    ``mask_source``). An unreadable object, a rejected pair or an unforeseen decoder failure gives
    a quarantined row, so one bad pair never stops a batch. Nothing is written.
    """
    try:
        image_bytes = storage.read_bytes(row["image_source"], storage_options)
        mask_bytes = storage.read_bytes(row["mask_source"], storage_options)
    except storage.OBJECT_ERRORS as exc:  # a vanished or unreadable object quarantines one pair, not the batch
        return ReadAndCleaned(quarantined(row, Reason.READ_ERROR, repr(exc)[:500]))
    row = {**row, "image_sha256": sha256(image_bytes), "mask_sha256": sha256(mask_bytes),
           "image_bytes": len(image_bytes)}
    try:
        pair = clean_pair(image_bytes, mask_bytes, config)
        image_data, mask_data = encode_clean_pair(pair, config.jpeg_quality)
    except Rejected as rejected:
        return ReadAndCleaned(quarantined(row, rejected.reason, rejected.detail))
    except Exception as exc:  # an unforeseen decoder failure must not stop the batch
        log.exception("internal error while cleaning %s", row["stem"])
        return ReadAndCleaned(quarantined(row, Reason.INTERNAL_ERROR, repr(exc)[:500]))
    height, width = pair.mask.shape
    row.update(orig_width=pair.orig_width, orig_height=pair.orig_height, width=width, height=height,
               fg_fraction=pair.fg_fraction, ambiguous_fraction=pair.ambiguous_fraction,
               conversions=",".join(pair.conversions), status=STATUS_OK, reason="", detail="")
    return ReadAndCleaned(row, pair, image_data, mask_data)


def quarantined(row: dict, reason: Reason, detail: str) -> dict:
    """Return ``row`` marked quarantined with ``reason`` and ``detail``."""
    return {**row, "status": STATUS_QUARANTINED, "reason": reason.value, "detail": detail}


def _clean_one(row: dict, batch: str, dataset_url: str, config: CleaningConfig, storage_options: dict | None,
               predict: Predict | None = None) -> dict:
    """Clean one pair end to end: the pair's failures become a quarantined row; a storage failure raises."""
    provenance = {key: row[key] for key in ("stem", "key", "image_source", "mask_source")}
    cleaned = read_and_clean({**provenance, "batch": batch}, config, storage_options)
    if cleaned.pair is None:
        return cleaned.row
    image_url, mask_url = clean_urls(dataset_url, row["key"])
    # A failed write is the storage's fault, not the pair's: it fails the task, whose retry redoes the shard.
    storage.write_bytes(image_url, cleaned.image_data, storage_options)
    storage.write_bytes(mask_url, cleaned.mask_data, storage_options)
    reasons = _audit_reasons(cleaned.pair, config, predict)
    return {**cleaned.row, "image_url": image_url, "mask_url": mask_url,
            "audit_reasons": ",".join(reasons), "audit_decision": ""}


@contextlib.contextmanager
def _opencv_single_threaded() -> Iterator[None]:
    """OpenCV without its own thread pool for the duration: on images of the working size, handing
    each call to its threads costs more than it saves (about 4 % of a pair's time), and the shard's
    own threads already keep the cores busy."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def clean_shard(
    shard_url: str,
    dataset_url: str,
    batch: str,
    config: CleaningConfig,
    storage_options: dict | None = None,
    io_threads: int = 4,
    predict: Predict | None = None,
) -> dict:
    """Clean every pair of one shard list and write its result table next to the plan.

    Takes the shard list's URL (from :func:`plan_batch`), the dataset URL and batch name, the
    config, and how many pairs to read/decode at once. ``predict`` (optional) maps a clean RGB
    image to a model's foreground probability at its size (e.g. :func:`tasks.serving.engines.probability_map`
    bound to an engine); with it the mask audit also flags masks a confident model disagrees with
    (``model_disagrees``). Returns ``{"result_url", "n_pairs", "n_ok", "n_quarantined",
    "reasons"}``. Pairs are processed one at a time per thread, so memory stays flat however large
    the shard. The process keeps freed memory in its heap (:func:`tasks.core.heap.keep_freed_memory`):
    every pair allocates the same full-size buffers, which the kernel would otherwise fault in again
    for each (about 1 ms of a 7-8 ms pair at studio sizes, ``benchmarks/README.md``).
    """
    keep_freed_memory()
    shard = read_table(shard_url, storage_options)
    rows = shard.astype(object).where(shard.notna(), None).to_dict("records")
    with _opencv_single_threaded(), ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        results = list(pool.map(lambda r: _clean_one(r, batch, dataset_url, config, storage_options, predict), rows))
    name = posixpath.basename(shard_url)
    result_url = write_table(
        to_frame(results, MANIFEST_COLUMNS), storage.join(dataset_url, "_work", "results", name), storage_options
    )
    reasons = Counter(r["reason"] for r in results if r["status"] == STATUS_QUARANTINED)
    n_ok = sum(r["status"] == STATUS_OK for r in results)
    log.info("shard %s: %d pairs, %d clean, quarantined %s", name, len(results), n_ok, dict(reasons))
    return {
        "result_url": result_url,
        "n_pairs": len(results),
        "n_ok": n_ok,
        "n_quarantined": len(results) - n_ok,
        "reasons": dict(reasons),
    }


def _collapse_duplicates(manifest: pd.DataFrame, dataset_url: str, storage_options: dict | None) -> pd.DataFrame:
    """Quarantine every clean pair whose image bytes equal an earlier (by stem) clean pair's."""
    manifest = manifest.sort_values("stem", kind="stable").reset_index(drop=True)
    ok = manifest["status"] == STATUS_OK
    first_stem: dict[str, str] = {}
    for index in manifest.index[ok]:
        digest = manifest.at[index, "image_sha256"]
        if digest not in first_stem:
            first_stem[digest] = manifest.at[index, "stem"]
            continue
        for url in (manifest.at[index, "image_url"], manifest.at[index, "mask_url"]):
            storage.remove(url, storage_options)  # our own derived file, never an input
        manifest.loc[index, ["status", "reason", "detail", "image_url", "mask_url"]] = [
            STATUS_QUARANTINED,
            Reason.DUPLICATE.value,
            f"same image bytes as {first_stem[digest]}",
            None,
            None,
        ]
    return manifest


#: Manifest columns that stages after cleaning write (clusters, splits, the reviewer's answers).
LATER_STAGE_COLUMNS = ("cluster", "split", "audit_decision")


def _keep_later_stages(manifest: pd.DataFrame, manifest_url: str, storage_options: dict | None) -> pd.DataFrame:
    """``manifest`` with the clusters, splits and review answers that an earlier cleaning of the same
    version gave its pairs (same key, same bytes), and a reviewer's fixed mask where the answer was
    ``fixed``, so cleaning a batch again loses none of them."""
    if not storage.exists(manifest_url, storage_options):
        return manifest
    previous = read_table(manifest_url, storage_options)
    columns = [c for c in LATER_STAGE_COLUMNS if c in previous]
    if not columns or not len(previous):
        return manifest
    ident = ["key", "image_sha256", "mask_sha256"]
    kept = previous.loc[previous["status"] == STATUS_OK, ident + columns + ["mask_url"]].drop_duplicates("key")
    ok = manifest["status"] == STATUS_OK
    merged = manifest.loc[ok, ident].merge(kept, on=ident, how="left")
    for column in (*columns, "mask_url"):
        manifest[column] = manifest[column].astype(object) if column in manifest else None
    for column in columns:
        values = merged[column].to_numpy()
        manifest.loc[ok, column] = [None if pd.isna(v) else v for v in values]
    if "audit_decision" in columns:  # a reviewer's fixed mask stays the pair's mask
        fixed = merged["audit_decision"].eq(AUDIT_FIXED).fillna(False).to_numpy(dtype=bool)  # NA: new bytes
        rows = manifest.index[ok][fixed]
        manifest.loc[rows, "mask_url"] = merged.loc[fixed, "mask_url"].to_numpy()
    return manifest


def finalize_dataset(
    dataset_url: str,
    batch: str,
    result_urls: list[str],
    listing_rejects_url: str,
    storage_options: dict | None = None,
) -> dict:
    """Merge shard results into ``manifest.parquet``, ``quarantine.parquet`` and ``summary.json``.

    Takes the dataset URL, the batch name, the result URLs returned by :func:`clean_shard` and the
    listing-rejects URL from :func:`plan_batch`. Returns the summary: ``{"version", "dataset_url",
    "batch", "pairs_in", "clean", "quarantined", "by_reason", "audit_flagged", "audit_reasons" (counts per
    reason code of the flagged clean pairs), "manifest_url", "quarantine_url"}``.
    """
    frames = [read_table(url, storage_options) for url in [listing_rejects_url, *result_urls]]
    frames = [f for f in frames if len(f)]
    manifest = pd.concat(frames, ignore_index=True) if frames else to_frame([], MANIFEST_COLUMNS)
    manifest = _collapse_duplicates(manifest, dataset_url, storage_options)
    manifest = _keep_later_stages(manifest, layout.manifest(dataset_url), storage_options)
    manifest = conform(manifest, MANIFEST_COLUMNS)
    quarantine = manifest.loc[manifest["status"] == STATUS_QUARANTINED, list(QUARANTINE_COLUMNS)].reset_index(drop=True)

    manifest_url = write_table(manifest, layout.manifest(dataset_url), storage_options)
    quarantine_url = write_table(quarantine, layout.quarantine(dataset_url), storage_options)
    by_reason = dict(sorted(Counter(quarantine["reason"].tolist()).items(), key=lambda kv: (-kv[1], kv[0])))
    flagged = manifest.loc[(manifest["status"] == STATUS_OK) & audit_flagged(manifest), "audit_reasons"]
    audit_counts = Counter(code for value in flagged for code in str(value).split(",") if code)
    summary = {
        "version": posixpath.basename(dataset_url.rstrip("/")),
        "dataset_url": dataset_url,
        "batch": batch,
        "pairs_in": int(len(manifest)),
        "clean": int((manifest["status"] == STATUS_OK).sum()),
        "quarantined": int(len(quarantine)),
        "by_reason": by_reason,
        "audit_flagged": int(len(flagged)),
        "audit_reasons": dict(sorted(audit_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "manifest_url": manifest_url,
        "quarantine_url": quarantine_url,
    }
    storage.write_text(layout.dataset_summary(dataset_url), json.dumps(summary, indent=2), storage_options)
    return summary


def format_summary(summary: dict) -> str:
    """Render a cleaning summary as the short table the CLI and the demo print."""
    lines = [
        f"dataset {summary['version']}  (batch {summary['batch']})",
        f"  pairs in      {summary['pairs_in']:>6}",
        f"  clean         {summary['clean']:>6}",
        f"  quarantined   {summary['quarantined']:>6}",
    ]
    lines += [f"    {reason:<22}{count:>6}" for reason, count in summary["by_reason"].items()]
    if summary.get("audit_flagged") is not None:
        lines.append(f"  masks flagged by the audit {summary['audit_flagged']:>4} (kept out of training and the test "
                     "split until a reviewer keeps or fixes them)")
        lines += [f"    {code:<22}{count:>6}" for code, count in summary.get("audit_reasons", {}).items()]
    return "\n".join(lines)
