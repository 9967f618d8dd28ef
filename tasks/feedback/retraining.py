"""Retraining data: pairs from the retraining pool plus an earlier dataset version become a new one.

The ``bgremoval_retraining`` DAG reads the state (:func:`read_state`), lists the pool pairs no run
has used yet (:func:`new_pool_pairs`: by pair id and version, never by a time cut-off), and once there are at least ``min_new_pairs`` of them
calls :func:`build_retraining_dataset`, triggers ``bgremoval_training`` with
``dataset_version=<the new version>`` and ``init_from=champion``, and records the run
(:func:`advance_state` + :func:`write_state`). No Airflow here.

The new version ``datasets/<version>/`` holds:

* ``manifest.parquet`` (:data:`tasks.core.manifest.MANIFEST_COLUMNS`): every clean (``ok``) row of the
  base version, copied as it is - cluster, split, and ``image_url``/``mask_url`` still pointing at
  the base version's clean files (nothing is copied into or rewritten in the base) - followed by
  one row per new pool pair (batch ``retraining-pool``, the pool URLs as sources);
* ``clean/images/<key>.jpg`` and ``clean/masks/<key>.png`` for the new pairs that passed
  cleaning (:func:`tasks.data.cleaning.clean_pair`, exactly as ingest cleans a studio batch);
* ``quarantine.parquet``: the new pairs that were rejected, with the reason code;
* ``summary.json``: what :func:`build_retraining_dataset` returns, plus the config and pair ids.

Rules for the new pairs:

* **Cleaning.** A pair that cannot be read or fails cleaning is quarantined with the cleaning
  reason (``read_error``, ``mask_full``, ``size_mismatch``...), never an exception.
* **Duplicates.** A clean pair whose image SHA-256 equals a clean base row's (``image_sha256``)
  or an earlier new pair's (pool order: ``at``, then pair id) is quarantined as ``duplicate``, the
  detail naming the row it duplicates. Only byte-identical images are caught: a re-encoded copy
  of a base photo is not.
* **Same pair again.** A pool pair whose id is already a ``retraining-pool`` row of the base (a
  published prediction a person corrected later, which rewrites the pool pair) replaces that row
  in the new manifest and keeps its split. A pair id equal to a base stem from a studio batch is
  quarantined as ``duplicate_stem``.
* **Cluster.** The nearest base-cluster centroid in the k-means feature space
  (:func:`tasks.data.features.pair_features`, standardised and weighted like
  :func:`tasks.data.clustering.weighted_matrix`, with the base's statistics). Centroids are the mean
  weighted vectors of each base cluster, from the base's feature shards
  (``datasets/<base>/features/shard-*.parquet``) when there are any, else from at most
  :data:`CENTROID_SAMPLE` pairs per cluster decoded on the spot. A base without clusters gives
  ``all``.
* **Split.** Base rows keep their split, so the test split is exactly the base's and the gate
  compares challenger and champion on the same images. New pairs go to ``val`` when
  ``stem_uniform(stem, seed) < val_fraction``, else to ``train``; never to ``test``.

The version id is ``retrain-<12 hex>``: a hash of the base version, the sorted ``(pair id, at)``
of the pairs and the config, so the same inputs give the same version and a re-run overwrites
its own files instead of adding a dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from tasks.core import layout, storage
from tasks.feedback.config import RetrainingConfig
from tasks.core.codecs import decode_pair
from tasks.data.cleaning import CLEANING_REVISION, CleaningConfig, Reason, safe_stem, sha256
from tasks.data.clustering import FEATURE_WEIGHTS
from tasks.feedback.queue import list_pool, now_iso
from tasks.data.features import FEATURE_NAMES, pair_features
from tasks.data.ingest import clean_urls, read_and_clean
from tasks.core.manifest import (
    MANIFEST_COLUMNS,
    QUARANTINE_COLUMNS,
    STATUS_OK,
    STATUS_QUARANTINED,
    read_table,
    to_frame,
    write_table,
)
from tasks.data.splits import SPLITS, stem_uniform

log = logging.getLogger(__name__)

#: The ``batch`` of every manifest row that came from the retraining pool.
POOL_BATCH = "retraining-pool"
#: Prefix of the dataset versions this module writes.
VERSION_PREFIX = "retrain-"
#: The cluster of new pairs when the base version has no clusters (what training uses for null).
DEFAULT_CLUSTER = "all"
#: At most this many pairs per base cluster are decoded when the base has no feature shards.
CENTROID_SAMPLE = 50
#: Where the loop's state lives, relative to the bucket.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_VERSION_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

def empty_state() -> dict:
    """The state before the first run: ``{"last_pair_at": None, "last_dataset_version": None,
    "history": [], "consumed": {}}`` (``consumed``: pair id → the ``at`` of the pair a run used)."""
    return {"last_pair_at": None, "last_dataset_version": None, "history": [], "consumed": {}}


def state_url(bucket_url: str) -> str:
    """``<bucket_url>/retraining/state.json`` (:func:`tasks.core.layout.retraining_state`)."""
    return layout.retraining_state(bucket_url)


def read_state(bucket_url: str, storage_options: dict | None = None) -> dict:
    """Read the loop's state from ``<bucket>/retraining/state.json``.

    Returns ``{"last_pair_at": ISO timestamp or None, "last_dataset_version": str or None,
    "history": [...]}`` (other keys kept); a missing file gives :func:`empty_state`. Raises
    ``ValueError`` when the file is not a JSON object.
    """
    url = state_url(bucket_url)
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        return empty_state()
    try:
        state = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url} is not valid JSON: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{url} must hold a JSON object, not {type(state).__name__}")
    return {**empty_state(), **state}


def write_state(bucket_url: str, state: dict, storage_options: dict | None = None) -> str:
    """Write ``state`` (a dict as :func:`read_state` returns) to ``<bucket>/retraining/state.json``.

    The write is atomic. Returns the URL. Raises ``ValueError`` when ``state`` lacks a key of
    :func:`empty_state` or ``history`` is not a list.
    """
    missing = set(empty_state()) - set(state)
    if missing:
        raise ValueError(f"state lacks {sorted(missing)}")
    if not isinstance(state["history"], list):
        raise ValueError("state['history'] must be a list")
    text = json.dumps(state, indent=2, sort_keys=True, default=str)
    return storage.write_text(state_url(bucket_url), text, storage_options)


def advance_state(state: dict, result: dict, at: str | None = None, **extra) -> dict:
    """The state after a run that built ``result`` (from :func:`build_retraining_dataset`).

    Returns a new dict: ``last_pair_at`` and ``last_dataset_version`` from ``result``, ``consumed``
    and ``quarantined`` (pair id → ``at``) merged with the run's, and a
    history entry ``{"at", "version", "base_version", "n_new", "n_new_ok", "n_quarantined",
    "last_pair_at", **extra}`` appended (``extra``: e.g. the triggered training run id).
    ``state`` itself is not changed.
    """
    entry = {
        "at": at or now_iso(),
        "version": result["version"],
        "base_version": result["base_version"],
        "n_new": result["n_new"],
        "n_new_ok": result["n_new_ok"],
        "n_quarantined": result["n_quarantined"],
        "last_pair_at": result["last_pair_at"],
        **extra,
    }
    previous = state.get("last_pair_at")
    newest = max([t for t in (previous, result["last_pair_at"]) if t], default=None, key=_instant)
    return {
        **state,
        "consumed": {**state.get("consumed", {}), **result.get("consumed", {})},
        "quarantined": {**state.get("quarantined", {}), **result.get("quarantined", {})},
        "last_pair_at": newest,
        "last_dataset_version": result["version"],
        "history": [*state.get("history", []), entry],
    }


def _instant(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


def new_pool_pairs(bucket_url: str, state: dict, storage_options: dict | None = None,
                   pool: list[dict] | None = None) -> list[dict]:
    """The retraining-pool pairs no run has used: ids not in ``state["consumed"]``, or rewritten since
    (another ``at``, e.g. a person's correction of a published pair). A pair that became visible
    late, with an older ``at`` than pairs already used, is still new: nothing is cut off by time.

    A state written before ``consumed`` existed counts the pairs up to its ``last_pair_at`` as used.
    Returns :func:`tasks.feedback.queue.list_pool` records (``pair_id``, ``at``, ``origin``,
    ``image_url``, ``mask_url``...), oldest first; ``pool``: the pool as already listed.
    """
    consumed = state.get("consumed") or {}
    legacy_cutoff = None if consumed else state.get("last_pair_at")
    pairs = list_pool(bucket_url, storage_options) if pool is None else pool
    if legacy_cutoff:
        pairs = [p for p in pairs if _instant(p["at"]) > _instant(legacy_cutoff)]
    return [p for p in pairs if consumed.get(str(p["pair_id"])) != str(p.get("at") or "")]


def pool_pairs_missing_from(bucket_url: str, base_version: str, state: dict,
                            storage_options: dict | None = None, pool: list[dict] | None = None) -> list[dict]:
    """The pool pairs an earlier run used (``state["consumed"]`` at their current ``at``) that the
    base version does not hold, or holds with another mask (a person corrected the pair since): that
    run's dataset was never promoted (its training failed the gate or never ran), so the champion's
    dataset lacks them. Without them they would be lost for good. A pair that run quarantined
    (``state["quarantined"]`` at the same ``at``) is not brought back: the same bytes would be
    quarantined again by every later run; a person's new version of it (a new ``at``) is new anyway.
    Returns :func:`tasks.feedback.queue.list_pool` records, oldest first; none when the base has no
    manifest (the run then stops on that). ``pool``: the pool as already listed."""
    manifest_url = layout.manifest(layout.dataset(bucket_url, base_version))
    if not base_version or not storage.exists(manifest_url, storage_options):
        return []
    manifest = read_table(manifest_url, storage_options)
    pool_rows = manifest[manifest["batch"] == POOL_BATCH] if "batch" in manifest else manifest.iloc[:0]
    digests = pool_rows["mask_sha256"] if "mask_sha256" in pool_rows else [None] * len(pool_rows)
    held = dict(zip(pool_rows["stem"].astype(str), digests))
    consumed, quarantined = state.get("consumed") or {}, state.get("quarantined") or {}
    listed = list_pool(bucket_url, storage_options) if pool is None else pool
    used = [p for p in listed if consumed.get(str(p["pair_id"])) == str(p.get("at") or "")
            and quarantined.get(str(p["pair_id"])) != str(p.get("at") or "")]
    # The base holds a pair only in the version it was cleaned from: a correction made since (the same
    # id, another mask) that a failed run used is missing from it too.
    masks = storage.read_many([p["mask_url"] for p in used if str(p["pair_id"]) in held], storage_options)
    return [p for p in used if str(p["pair_id"]) not in held
            or sha256(masks.get(p["mask_url"], b"")) != held[str(p["pair_id"])]]


# --------------------------------------------------------------------------------------------
# Versions and the base
# --------------------------------------------------------------------------------------------

def retraining_version(base_version: str, pairs: list[dict], config: RetrainingConfig) -> str:
    """``retrain-<12 hex>`` from the base version, the sorted ``(pair_id, at)``, the config and the
    cleaning's revision.

    The same inputs always give the same id; another pair, a rewritten pair (new ``at``), another
    base, config or cleaning revision give another one.
    """
    payload = json.dumps(
        {
            "base": base_version,
            "pairs": sorted((str(p["pair_id"]), str(p.get("at") or "")) for p in pairs),
            "config": config.to_dict(),
            "cleaning_revision": CLEANING_REVISION,
        },
        sort_keys=True,
    )
    return VERSION_PREFIX + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def _absolute(url, base_url: str):
    """A manifest URL made absolute against the base version's folder (absolute ones unchanged)."""
    if url is None or (isinstance(url, float) and np.isnan(url)) or url is pd.NA:
        return url
    url = str(url)
    if _SCHEME.match(url) or url.startswith("/"):
        return url
    return storage.join(base_url, url)


def _base_rows(base_url: str, storage_options: dict | None) -> pd.DataFrame:
    """The base version's clean rows with every MANIFEST_COLUMN (absent ones as nulls)."""
    manifest_url = layout.manifest(base_url)
    if not storage.exists(manifest_url, storage_options):
        raise ValueError(f"base dataset version has no manifest at {manifest_url}")
    manifest = read_table(manifest_url, storage_options)
    for column in ("stem", "key", "image_url", "mask_url", "status"):
        if column not in manifest.columns:
            raise ValueError(f"base manifest {manifest_url} lacks column {column!r}")
    ok = manifest[manifest["status"] == STATUS_OK].copy()
    for column in MANIFEST_COLUMNS:
        if column not in ok.columns:
            ok[column] = None
    ok["image_url"] = [_absolute(u, base_url) for u in ok["image_url"]]
    ok["mask_url"] = [_absolute(u, base_url) for u in ok["mask_url"]]
    return ok[list(MANIFEST_COLUMNS)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Clusters: nearest base centroid
# --------------------------------------------------------------------------------------------

@dataclass
class Centroids:
    """Base cluster centroids in the weighted, standardised feature space.

    ``medians``, ``mean`` and ``scale`` are the base statistics (per feature) used to fill
    missing values and standardise; ``weights`` the feature weights; ``names`` the cluster of
    each row of ``vectors``; ``source`` is ``"features"`` (shards) or ``"pairs"`` (decoded).
    """

    names: list[str]
    vectors: np.ndarray
    medians: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    source: str
    n_used: int

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Standardise and weight raw feature rows (``n x len(FEATURE_NAMES)``) with the base statistics."""
        values = np.asarray(values, np.float64).reshape(-1, len(FEATURE_NAMES))
        values = np.where(np.isfinite(values), values, self.medians)
        return (values - self.mean) / self.scale * self.weights

    def nearest(self, vector: np.ndarray) -> tuple[str, float]:
        """``(cluster, distance)`` of the centroid nearest to one raw feature vector."""
        point = self.transform(vector)[0]
        distances = np.linalg.norm(self.vectors - point, axis=1)
        index = int(np.argmin(distances))
        return self.names[index], float(distances[index])


def fit_centroids(frame: pd.DataFrame, source: str = "features") -> Centroids:
    """Centroids from a table with a ``cluster`` column and the FEATURE_NAMES columns.

    Standardisation and weights are those of :func:`tasks.data.clustering.weighted_matrix` (median for
    non-finite values, z-score with the population standard deviation, a constant feature left
    unscaled, then :data:`tasks.data.clustering.FEATURE_WEIGHTS`), fitted on ``frame``. Raises
    ``ValueError`` on an empty frame.
    """
    if not len(frame):
        raise ValueError("no base features to compute cluster centroids from")
    values = frame[list(FEATURE_NAMES)].to_numpy(np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    medians = np.nan_to_num(np.nanmedian(values, axis=0)) if np.isfinite(values).any() else np.zeros(values.shape[1])
    values = np.where(np.isnan(values), medians, values)
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    scale = np.where(std > 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0), std, 1.0)
    weights = np.array([FEATURE_WEIGHTS.get(n, 1.0) for n in FEATURE_NAMES])
    weighted = (values - mean) / scale * weights
    clusters = frame["cluster"].astype(str).to_numpy()
    names = sorted(set(clusters))
    vectors = np.vstack([weighted[clusters == name].mean(axis=0) for name in names])
    return Centroids(names=names, vectors=vectors, medians=medians, mean=mean, scale=scale,
                     weights=weights, source=source, n_used=len(frame))


def _feature_shards(base_url: str, storage_options: dict | None) -> list[str]:
    root = layout.features(base_url)
    return [o.url for o in storage.list_objects(root, storage_options)
            if re.fullmatch(r"shard-\d+\.parquet", o.relpath)]


def _decoded_features(row: dict, storage_options: dict | None) -> np.ndarray | None:
    try:
        image, mask = decode_pair(storage.read_bytes(row["image_url"], storage_options),
                                  storage.read_bytes(row["mask_url"], storage_options))
        return pair_features(image, mask)
    except Exception as exc:  # one unreadable base pair must not stop the build
        log.warning("centroids: skipping base pair %s: %r", row["stem"], exc)
        return None


def base_centroids(base_url: str, base: pd.DataFrame, seed: int = 0, storage_options: dict | None = None,
                   io_threads: int = 4) -> Centroids | None:
    """Cluster centroids of the base version, or None when its clean rows have no cluster.

    Takes the base URL and its clean rows (``stem``, ``cluster``, ``image_url``, ``mask_url``).
    Uses every clustered row found in the feature shards under ``<base>/features/``; without
    shards (or when they cover none of the clustered rows) decodes at most
    :data:`CENTROID_SAMPLE` pairs per cluster, picked by ``stem_uniform(stem, seed)``.
    """
    clustered = base[base["cluster"].notna()][["stem", "cluster", "image_url", "mask_url"]].copy()
    if not len(clustered):
        return None
    clustered["cluster"] = clustered["cluster"].astype(str)
    shard_urls = _feature_shards(base_url, storage_options)
    if shard_urls:
        frames = [read_table(url, storage_options) for url in shard_urls]
        frames = [f for f in frames if len(f) and set(FEATURE_NAMES) <= set(f.columns)]
        if frames:
            features = pd.concat(frames, ignore_index=True).drop_duplicates("stem", keep="first")
            joined = clustered[["stem", "cluster"]].merge(features, on="stem", how="inner")
            if len(joined):
                return fit_centroids(joined, source="features")
        log.warning("feature shards under %s cover no clustered pair; decoding pairs instead", base_url)
    clustered["u"] = [stem_uniform(str(s), seed) for s in clustered["stem"]]
    sample = (clustered.sort_values(["cluster", "u", "stem"], kind="stable")
              .groupby("cluster", sort=True).head(CENTROID_SAMPLE))
    records = sample.to_dict("records")
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        vectors = list(pool.map(lambda r: _decoded_features(r, storage_options), records))
    kept = [(r, v) for r, v in zip(records, vectors) if v is not None]
    if not kept:
        raise ValueError(f"none of the sampled base pairs under {base_url} could be read for cluster centroids")
    frame = pd.DataFrame(np.vstack([v for _, v in kept]), columns=list(FEATURE_NAMES))
    frame.insert(0, "cluster", [r["cluster"] for r, _ in kept])
    return fit_centroids(frame, source="pairs")


# --------------------------------------------------------------------------------------------
# New pairs
# --------------------------------------------------------------------------------------------

def _clean_pool_pair(pair: dict, config: CleaningConfig, storage_options: dict | None) -> dict:
    """Read and clean one pool pair (no writes). Never raises: failures give a quarantined row.

    Returns a manifest row dict, plus ``_image``/``_mask`` (encoded clean files) and ``_features``
    for a clean pair.
    """
    pair_id = str(pair["pair_id"])
    cleaned = read_and_clean({"stem": pair_id, "key": safe_stem(pair_id), "batch": POOL_BATCH,
                              "image_source": pair["image_url"], "mask_source": pair["mask_url"]},
                             config, storage_options)
    if cleaned.pair is None:
        return cleaned.row
    try:
        features = pair_features(cleaned.pair.image, cleaned.pair.mask)
    except ValueError as exc:
        log.warning("features of pool pair %s: %r", pair_id, exc)
        features = None
    return {**cleaned.row, "_image": cleaned.image_data, "_mask": cleaned.mask_data, "_features": features}


def _quarantine(row: dict, reason: Reason, detail: str) -> dict:
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    for column in ("orig_width", "orig_height", "width", "height", "fg_fraction", "ambiguous_fraction",
                   "conversions", "image_url", "mask_url", "cluster", "split"):
        out[column] = None
    return {**out, "status": STATUS_QUARANTINED, "reason": reason.value, "detail": detail}


def _new_split(stem: str, config: RetrainingConfig) -> str:
    return "val" if stem_uniform(stem, config.seed) < config.val_fraction else "train"


def _pair_order(pair: dict) -> tuple:
    return (str(pair.get("at") or ""), str(pair["pair_id"]))


def build_retraining_dataset(
    bucket_url: str,
    base_version: str,
    pairs: list[dict],
    config: RetrainingConfig | None = None,
    storage_options: dict | None = None,
    io_threads: int = 4,
) -> dict:
    """Write a new dataset version: the base version's clean rows plus the new pool pairs.

    Takes the bucket URL (``s3://bucket`` or a local folder), the base version id (a folder under
    ``datasets/``), the pool pairs (records of :func:`new_pool_pairs`: ``pair_id``, ``at``,
    ``image_url``, ``mask_url``), the config, storage options and how many pairs to read and
    clean at once. Writes ``datasets/<version>/`` as the module docstring describes; the base
    version and the pool are only read.

    Returns ``{"version", "dataset_url", "base_version", "n_base", "n_superseded", "n_new",
    "n_new_ok", "n_quarantined", "reasons": {reason: n}, "splits": {split: n} (all clean rows),
    "new_splits": {split: n}, "new_clusters": {cluster: n}, "centroids": "features" | "pairs" |
    None, "last_pair_at", "consumed": {pair id: at}, "quarantined": {pair id: at} (the pool pairs this
    version quarantined for what their bytes are: not those it could not read, which may be readable
    next time), "manifest_url", "quarantine_url"}``. Raises ``ValueError`` when
    ``pairs`` is empty or the base version has no manifest.
    """
    config = config or RetrainingConfig()
    if not pairs:
        raise ValueError("no pool pairs given: there is nothing to retrain on")
    if not isinstance(base_version, str) or not _VERSION_OK.match(base_version):
        raise ValueError(f"base_version must be a dataset version id (a folder under datasets/), got {base_version!r}")
    for pair in pairs:
        missing = {"pair_id", "image_url", "mask_url"} - set(pair)
        if missing:
            raise ValueError(f"pool pair {pair.get('pair_id')!r} lacks {sorted(missing)}")
    base_url = layout.dataset(bucket_url, base_version)
    base = _base_rows(base_url, storage_options)
    version = retraining_version(base_version, pairs, config)
    if version == base_version:
        raise ValueError("the new version would overwrite its base")
    dataset_url = layout.dataset(bucket_url, version)
    ordered = sorted(pairs, key=_pair_order)
    log.info("retraining dataset %s: base %s (%d clean rows) + %d pool pairs", version, base_version,
             len(base), len(ordered))

    cleaning = config.cleaning_config()
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        rows = list(pool.map(lambda p: _clean_pool_pair(p, cleaning, storage_options), ordered))

    base_by_stem = {str(s): i for i, s in enumerate(base["stem"])}
    base_sha: dict[str, int] = {}
    for index, digest in enumerate(base["image_sha256"]):
        if isinstance(digest, str) and digest and digest not in base_sha:
            base_sha[digest] = index
    superseded: dict[int, str] = {}  # base row index -> the new stem that replaces it
    seen_stems: set[str] = set()
    new_sha: dict[str, str] = {}
    for i, row in enumerate(rows):
        stem = row["stem"]
        if stem in seen_stems:
            rows[i] = _quarantine(row, Reason.DUPLICATE_STEM, f"pair id {stem!r} given twice; kept the first")
            continue
        seen_stems.add(stem)
        replaces = base_by_stem.get(stem)
        if replaces is not None and base.at[replaces, "batch"] != POOL_BATCH:
            detail = f"base {base_version} already has stem {stem!r} from batch {base.at[replaces, 'batch']}"
            rows[i] = _quarantine(row, Reason.DUPLICATE_STEM, detail)
            continue
        if row["status"] != STATUS_OK:
            continue  # a failed new version of a pool pair leaves the base row as it was
        digest = row["image_sha256"]
        if digest in base_sha and base_sha[digest] != replaces:
            other = base.iloc[base_sha[digest]]
            rows[i] = _quarantine(row, Reason.DUPLICATE,
                                  f"same image bytes as base row {other['stem']} (batch {other['batch']}, "
                                  f"version {base_version})")
            continue
        if digest in new_sha:
            rows[i] = _quarantine(row, Reason.DUPLICATE, f"same image bytes as pool pair {new_sha[digest]}")
            continue
        new_sha[digest] = stem
        if replaces is not None:
            superseded[replaces] = stem

    centroids = None
    if any(r["status"] == STATUS_OK for r in rows):
        centroids = base_centroids(base_url, base, config.seed, storage_options, io_threads)
    fallback_cluster = DEFAULT_CLUSTER
    if centroids is not None:
        sizes = Counter(base["cluster"].dropna().astype(str))
        fallback_cluster = min(sizes, key=lambda c: (-sizes[c], c))
    kept_split = {stem: base.at[index, "split"] for index, stem in superseded.items()}

    def finish(row: dict) -> dict:
        if row["status"] != STATUS_OK:
            return {k: v for k, v in row.items() if not k.startswith("_")}
        image_url, mask_url = clean_urls(dataset_url, row["key"])
        storage.write_bytes(image_url, row["_image"], storage_options)
        storage.write_bytes(mask_url, row["_mask"], storage_options)
        if centroids is None:
            cluster = DEFAULT_CLUSTER
        elif row["_features"] is None:
            cluster = fallback_cluster
        else:
            cluster, _ = centroids.nearest(row["_features"])
        split = kept_split.get(row["stem"])
        if split is None or (isinstance(split, float) and np.isnan(split)) or split is pd.NA:
            split = _new_split(row["stem"], config)
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        return {**out, "image_url": image_url, "mask_url": mask_url, "cluster": cluster, "split": split}

    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        rows = list(pool.map(finish, rows))

    kept_base = base.drop(index=list(superseded)).reset_index(drop=True) if superseded else base
    base_records = kept_base.astype(object).where(kept_base.notna(), None).to_dict("records")
    manifest = to_frame(base_records + rows, MANIFEST_COLUMNS)
    new_rows = to_frame(rows, MANIFEST_COLUMNS)
    quarantine = new_rows.loc[new_rows["status"] == STATUS_QUARANTINED, list(QUARANTINE_COLUMNS)].reset_index(drop=True)
    manifest_url = write_table(manifest, layout.manifest(dataset_url), storage_options)
    quarantine_url = write_table(quarantine, layout.quarantine(dataset_url), storage_options)

    ok_new = new_rows[new_rows["status"] == STATUS_OK]
    ok_all = manifest[manifest["status"] == STATUS_OK]
    reasons = Counter(quarantine["reason"].astype(str).tolist())
    stamps = [str(p["at"]) for p in ordered if p.get("at")]
    result = {
        "version": version,
        "dataset_url": dataset_url,
        "base_version": base_version,
        "n_base": int(len(kept_base)),
        "n_superseded": len(superseded),
        "n_new": len(rows),
        "n_new_ok": int(len(ok_new)),
        "n_quarantined": int(len(quarantine)),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "splits": _counts(ok_all["split"]),
        "new_splits": _counts(ok_new["split"]),
        "new_clusters": dict(sorted(Counter(ok_new["cluster"].astype(str)).items())),
        "centroids": centroids.source if centroids is not None else None,
        "last_pair_at": max(stamps, key=_instant) if stamps else None,
        "consumed": {str(p["pair_id"]): str(p.get("at") or "") for p in ordered},
        "quarantined": {str(p["pair_id"]): str(p.get("at") or "") for p, row in zip(ordered, rows)
                        if row["status"] == STATUS_QUARANTINED and row["reason"] != Reason.READ_ERROR.value},
        "manifest_url": manifest_url,
        "quarantine_url": quarantine_url,
    }
    summary = {**result, "config": config.to_dict(), "pair_ids": [str(p["pair_id"]) for p in ordered]}
    storage.write_text(layout.dataset_summary(dataset_url), json.dumps(summary, indent=2), storage_options)
    log.info("retraining dataset %s: %d base rows kept, %d/%d new pairs clean, quarantined %s, splits %s",
             version, result["n_base"], result["n_new_ok"], result["n_new"], result["reasons"], result["splits"])
    return result


def _counts(splits: pd.Series) -> dict[str, int]:
    """``{split: n}`` in SPLITS order, then any other value (a null split counts as train)."""
    values = Counter(splits.fillna("train").astype(str))
    ordered = {s: int(values.pop(s, 0)) for s in SPLITS}
    return {**ordered, **{k: int(v) for k, v in sorted(values.items())}}


def format_result(result: dict) -> str:
    """Render a :func:`build_retraining_dataset` result as the short table the DAG log prints."""
    lines = [
        f"dataset {result['version']}  (base {result['base_version']})",
        f"  base rows kept   {result['n_base']:>6}",
        f"  new pairs        {result['n_new']:>6}",
        f"  new clean        {result['n_new_ok']:>6}",
        f"  quarantined      {result['n_quarantined']:>6}",
    ]
    lines += [f"    {reason:<22}{count:>6}" for reason, count in result["reasons"].items()]
    lines.append("  splits  " + "  ".join(f"{k} {v}" for k, v in result["splits"].items()))
    return "\n".join(lines)
