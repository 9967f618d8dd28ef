"""Per-pair features for clustering products: the shape of the mask and the colours of the photo.

Shape comes from the mask alone, cropped to the product's bounding box so the product's size in
the frame does not matter: aspect, area, fill, solidity, a width profile down the height, how
many separate runs of product each row crosses (two legs, or sleeve-body-sleeve), how far the top
third spreads beyond the middle (sleeves), Hu moments. Colour compares the product with its
background in HSV and Lab.

The stage functions are mapped by the DAG over shards of a dataset version's clean pairs:
:func:`plan_feature_shards` cuts the ok rows (sorted by stem) into ranges, and
:func:`extract_shard_features` writes ``features/shard-<i>.parquet`` for one range.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pandas as pd

from tasks.core.shards import check_shard_size, shard_ranges
from tasks.core import layout, storage
from tasks.core.codecs import decode_pair
from tasks.core.manifest import STATUS_OK, read_table, write_table
from tasks.core.shards import PAIRS_PER_SHARD

log = logging.getLogger(__name__)

#: Number of horizontal bands of the width profile (top to bottom).
PROFILE_BANDS = 10

_SHAPE_NAMES: tuple[str, ...] = (
    "aspect_log",          # log(height / width) of the bounding box
    "area_fraction",       # product pixels / image pixels
    "frame_span",          # how much of the limiting image side the product spans (box / image)
    "bbox_fill",           # product pixels / bounding-box pixels
    "solidity",            # product pixels / convex-hull pixels
    *(f"width_{i}" for i in range(PROFILE_BANDS)),  # mean row coverage per band / box width
    "multi_run_share",     # share of rows crossing 2+ separate runs (legs, straps, handles)
    "two_run_share",       # share of rows crossing exactly 2 runs
    "three_run_share",     # share of rows crossing 3+ runs (sleeve, body, sleeve)
    "leg_gap",             # share of rows in the bottom quarter crossing 2+ runs
    "two_run_depth",       # rows crossing exactly 2 runs, in box widths (leg length)
    "three_run_depth",     # rows crossing 3+ runs, in box widths (sleeves hanging apart)
    "runs_top",            # mean runs per row in the top, middle and bottom thirds
    "runs_middle",
    "runs_bottom",
    "sleeve_spread",       # widest extent in the top third / median extent in the middle third
    "extent_middle",       # median extent (leftmost to rightmost) in the middle third / box width
    "centroid_y",          # centre of mass, as a share of the box height
    "symmetry",            # IoU of the box with its left-right mirror
    *(f"hu_{i}" for i in range(7)),  # Hu moments, -log10|h|
)

_COLOUR_NAMES: tuple[str, ...] = (
    "product_v_mean",
    "product_v_std",
    "product_s_mean",
    "product_s_std",
    "background_v_mean",
    "background_v_std",
    "background_s_mean",
    "background_s_std",
    "contrast_v",          # |product V mean - background V mean|
    "contrast_lab",        # Lab Delta E (CIE76) between mean product and mean background colour
    "contrast_lab_log",    # log(1 + contrast_lab): pale-on-pale products stand apart
    "product_lightness",   # mean Lab L* of the product / 100
    "product_chroma",      # mean Lab chroma sqrt(a*^2 + b*^2) of the product / 100
    "product_near_bg",     # share of product pixels within Delta E 10 of the mean background
)

#: Names of the entries of :func:`pair_features`'s vector, in order.
FEATURE_NAMES: tuple[str, ...] = _SHAPE_NAMES + _COLOUR_NAMES

_KERNEL = np.ones((3, 3), np.uint8)


def _crop(fg: np.ndarray) -> np.ndarray:
    """The bounding box of the foreground of a boolean mask."""
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    return fg[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _thirds(values: np.ndarray) -> list[np.ndarray]:
    """Split a per-row array into top, middle and bottom thirds (each at least one row)."""
    n = len(values)
    cuts = [0, max(1, n // 3), max(2, 2 * n // 3), n] if n >= 3 else [0, n, n, n]
    parts = [values[cuts[i] : cuts[i + 1]] for i in range(3)]
    return [p if len(p) else values for p in parts]


def _width_profile(box: np.ndarray) -> np.ndarray:
    """Mean product coverage of the rows of each of ``PROFILE_BANDS`` bands, per box width."""
    height, width = box.shape
    coverage = box.sum(axis=1) / width
    band = np.arange(height) * PROFILE_BANDS // height
    totals = np.bincount(band, weights=coverage, minlength=PROFILE_BANDS)
    counts = np.bincount(band, minlength=PROFILE_BANDS)
    return np.divide(totals, counts, out=np.zeros(PROFILE_BANDS), where=counts > 0)


def _run_features(box: np.ndarray) -> list[float]:
    """Statistics of the number of separate product runs crossed by each row of the box."""
    width = box.shape[1]
    runs = box[:, 0].astype(np.int32) + (box[:, 1:] & ~box[:, :-1]).sum(axis=1)
    bottom = runs[-max(1, len(runs) // 4) :]
    top, middle, low = _thirds(runs.astype(np.float64))
    return [
        float((runs >= 2).mean()),
        float((runs == 2).mean()),
        float((runs >= 3).mean()),
        float((bottom >= 2).mean()),
        float((runs == 2).sum() / width),
        float((runs >= 3).sum() / width),
        float(top.mean()),
        float(middle.mean()),
        float(low.mean()),
    ]


def _extent_features(box: np.ndarray) -> list[float]:
    """Sleeve spread (top-third max extent / middle-third median extent) and the middle extent."""
    width = box.shape[1]
    cols = np.arange(width)
    left = np.where(box, cols, width).min(axis=1)
    right = np.where(box, cols, -1).max(axis=1)
    extent = np.maximum(right - left + 1, 0).astype(np.float64) / width
    top, middle, _ = _thirds(extent)
    mid = float(np.median(middle))
    return [min(float(top.max()) / max(mid, 0.05), 5.0), mid]


def _hu_log(box: np.ndarray) -> list[float]:
    """The seven Hu moments of the box, log-scaled as ``-log10(|h|)`` (capped at 30 for h = 0).

    The sign of the higher moments flips with tiny changes of a near-symmetric shape (and the
    last one with a mirror image), so only the magnitude is kept.
    """
    hu = np.abs(cv2.HuMoments(cv2.moments(box.astype(np.uint8), binaryImage=True)).ravel())
    return [float(min(-np.log10(h), 30.0)) if h > 0 else 30.0 for h in hu]


def _solidity(box: np.ndarray) -> float:
    """Product area over the area of the convex hull of all its outline points."""
    contours, _ = cv2.findContours(box.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.vstack(contours))
    return float(box.sum()) / max(float(cv2.contourArea(hull)), float(box.sum()), 1.0)


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Shape features of a mask (HxW, product > 127) in the order of the shape part of FEATURE_NAMES."""
    fg = mask > 127
    box = _crop(fg)
    height, width = box.shape
    frame_span = max(height / fg.shape[0], width / fg.shape[1])
    mirror_union = np.logical_or(box, box[:, ::-1]).sum()
    centroid_y = float((np.arange(height)[:, None] * box).sum() / box.sum() + 0.5) / height
    values = [
        float(np.log(height / width)),
        float(fg.mean()),
        frame_span,
        float(box.mean()),
        _solidity(box),
        *_width_profile(box),
        *_run_features(box),
        *_extent_features(box),
        centroid_y,
        float(np.logical_and(box, box[:, ::-1]).sum() / mirror_union),
        *_hu_log(box),
    ]
    return np.asarray(values, dtype=np.float64)


def _inner_and_outer(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Product pixels away from the edge and background pixels away from it (anti-aliased band out)."""
    m = fg.astype(np.uint8)
    inner = cv2.erode(m, _KERNEL, iterations=2) > 0
    outer = cv2.dilate(m, _KERNEL, iterations=2) == 0
    return (inner if inner.any() else fg), (outer if outer.any() else ~fg)


def colour_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Colour features of an RGB image (HxWx3 uint8) with its mask, in FEATURE_NAMES order.

    HSV values are scaled to 0..1; Lab is CIE L*a*b* (L 0..100). A mask covering the whole image
    has no background: the background statistics are then taken from the product's outer ring.
    """
    fg = mask > 127
    product, background = _inner_and_outer(fg)
    if not background.any():
        background = fg & ~(cv2.erode(fg.astype(np.uint8), _KERNEL, iterations=2) > 0)
        background = background if background.any() else fg
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float64) / 255.0
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).astype(np.float64)
    p_s, p_v = hsv[..., 1][product], hsv[..., 2][product]
    b_s, b_v = hsv[..., 1][background], hsv[..., 2][background]
    lab_p, lab_b = lab[product], lab[background].mean(axis=0)
    near = np.linalg.norm(lab_p - lab_b, axis=1) < 10.0
    delta_e = float(np.linalg.norm(lab_p.mean(axis=0) - lab_b))
    values = [
        p_v.mean(), p_v.std(), p_s.mean(), p_s.std(),
        b_v.mean(), b_v.std(), b_s.mean(), b_s.std(),
        abs(p_v.mean() - b_v.mean()),
        delta_e,
        np.log1p(delta_e),
        lab_p[:, 0].mean() / 100.0,
        np.hypot(lab_p[:, 1], lab_p[:, 2]).mean() / 100.0,
        near.mean(),
    ]
    return np.asarray(values, dtype=np.float64)


def pair_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The feature vector of one clean pair.

    Takes an RGB image (HxWx3 uint8) and its mask (HxW uint8, product > 127) of the same size.
    Returns a float32 vector of ``len(FEATURE_NAMES)`` finite values. Raises ``ValueError`` when
    the sizes differ or the mask holds no product.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} do not form a pair")
    if not (mask > 127).any():
        raise ValueError("the mask holds no product pixels")
    values = np.concatenate([shape_features(mask), colour_features(image, mask)])
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def ok_rows(dataset_url: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The manifest rows with status ok, sorted by stem (the order shards are cut in)."""
    manifest = read_table(layout.manifest(dataset_url), storage_options)
    ok = manifest[manifest["status"] == STATUS_OK]
    return ok.sort_values("stem", kind="stable").reset_index(drop=True)


def features_url(dataset_url: str, shard: int) -> str:
    """URL of one shard's feature table: ``<dataset_url>/features/shard-<i:05d>.parquet``."""
    return storage.join(layout.features(dataset_url), f"shard-{shard:05d}.parquet")


def plan_feature_shards(dataset_url: str, shard_size: int = PAIRS_PER_SHARD, storage_options: dict | None = None,
                        max_shards: int | None = None) -> list[dict]:
    """Cut a dataset version's ok rows (sorted by stem) into ranges for :func:`extract_shard_features`.

    Takes the dataset URL and the number of pairs per shard (grown when more than ``max_shards``
    shards would be needed, see :func:`tasks.core.shards.shard_ranges`). Returns one dict per shard,
    ``{"dataset_url", "shard", "start", "stop"}`` (row range, stop exclusive); an empty list when
    the dataset has no clean pair.
    """
    check_shard_size(shard_size, max_shards)
    n = len(ok_rows(dataset_url, storage_options))
    return [
        {"dataset_url": dataset_url, "shard": index, "start": start, "stop": stop}
        for index, (start, stop) in enumerate(shard_ranges(n, shard_size, max_shards))
    ]


def _row_features(row: dict, storage_options: dict | None) -> np.ndarray | None:
    """Features of one manifest row, or None (with a logged warning) when its pair cannot be used."""
    try:
        image, mask = decode_pair(
            storage.read_bytes(row["image_url"], storage_options),
            storage.read_bytes(row["mask_url"], storage_options),
        )
        return pair_features(image, mask)
    except Exception as exc:  # one unreadable pair is skipped, never the shard
        log.warning("features: skipping %s: %r", row["stem"], exc)
        return None


def extract_shard_features(
    dataset_url: str,
    shard: int,
    start: int,
    stop: int,
    storage_options: dict | None = None,
    io_threads: int = 4,
) -> dict:
    """Compute the features of ok rows ``start:stop`` (by stem) and write them as one shard table.

    Takes the dataset URL, the shard index and its row range (from :func:`plan_feature_shards`)
    and how many pairs to read and decode at once. Writes ``<dataset_url>/features/
    shard-<i:05d>.parquet`` (columns ``stem``, ``key`` and FEATURE_NAMES as float32) atomically.
    Returns ``{"features_url", "shard", "n", "skipped"}``; a pair that cannot be read or decoded
    is left out, logged and counted in ``skipped``.
    """
    rows = ok_rows(dataset_url, storage_options).iloc[start:stop]
    records = rows[["stem", "key", "image_url", "mask_url"]].astype(object).to_dict("records")
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        vectors = list(pool.map(lambda r: _row_features(r, storage_options), records))
    kept = [(r, v) for r, v in zip(records, vectors) if v is not None]
    values = np.vstack([v for _, v in kept]) if kept else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    frame = pd.DataFrame(values, columns=list(FEATURE_NAMES)).astype(np.float32)
    frame.insert(0, "key", pd.array([r["key"] for r, _ in kept], dtype="string"))
    frame.insert(0, "stem", pd.array([r["stem"] for r, _ in kept], dtype="string"))
    url = write_table(frame, features_url(dataset_url, shard), storage_options)
    skipped = len(records) - len(kept)
    log.info("features shard %d: %d pairs, %d skipped", shard, len(kept), skipped)
    return {"features_url": url, "shard": shard, "n": len(kept), "skipped": skipped}
