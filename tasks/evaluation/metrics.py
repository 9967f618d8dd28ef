"""Evaluation measures of the seed model: IoU, MAE, boundary F-measure and the summary table.

Pure numpy (plus OpenCV for morphology, distance transforms and resizing); no I/O, no torch in the
maths (importing :mod:`tasks.model.preprocess` for the resize does load the :mod:`tasks.model` package).

Mask conventions, shared by every function here:

* a *binary mask* is a ``bool`` array, or a numeric array holding 0/1 or 0/255. Numeric masks
  are thresholded at half their scale: at 0.5 when every value is ≤ 1, else at 127.5;
* a *probability map* is a float array in ``[0, 1]`` or a ``uint8`` array in ``0..255`` (divided
  by 255).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from tasks.model.preprocess import as_probability, resize_to_original, squeeze_channel

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MASK_THRESHOLD",
    "DAVIS_TOLERANCE_FRACTION",
    "as_binary",
    "ImageScore",
    "boundary_f",
    "boundary_tolerance",
    "format_summary",
    "iou",
    "mae",
    "resize_to_original",
    "summarise",
]

#: Probability at or below which a map's pixel counts as background: every scorer, report and
#: calibration cuts the model's map here unless told otherwise.
MASK_THRESHOLD = 0.5

#: IoU thresholds reported by :func:`summarise` by default.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.95, 0.97, 0.99)

#: Boundary tolerance as a fraction of the image diagonal (DAVIS benchmark).
DAVIS_TOLERANCE_FRACTION = 0.0075


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: prediction {a.shape} vs truth {b.shape}")


def as_binary(mask: np.ndarray) -> np.ndarray:
    """Return ``mask`` as a bool array (see the module docstring for the convention)."""
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if arr.size == 0:
        return arr.astype(bool)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"mask must be bool or numeric, got dtype {arr.dtype}")
    threshold = MASK_THRESHOLD if float(arr.max()) <= 1.0 else MASK_THRESHOLD * 255
    return arr > threshold


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two binary masks of the same shape.

    Both masks empty gives 1.0 (perfect agreement on an image without foreground); exactly one
    empty gives 0.0. Raises ``ValueError`` naming both shapes when they differ.
    """
    p, t = np.asarray(pred), np.asarray(truth)
    _check_same_shape(p, t, "iou")
    p, t = as_binary(p), as_binary(t)
    union = int(np.count_nonzero(p | t))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & t)) / union


def mae(prob: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error between a probability map and the binary truth, in ``[0, 1]``.

    ``prob`` is a float map in ``[0, 1]`` or a ``uint8`` map in ``0..255`` (scaled by 1/255);
    ``truth`` is a binary mask. An empty image (no pixels) gives 0.0. Raises ``ValueError`` when
    the shapes differ or a float map leaves ``[0, 1]``.
    """
    p, t = np.asarray(prob), np.asarray(truth)
    _check_same_shape(p, t, "mae")
    if p.size == 0:
        return 0.0
    diff = np.abs(as_probability(p).astype(np.float64) - as_binary(t))
    return float(diff.mean())


def boundary_tolerance(shape: tuple[int, ...]) -> int:
    """Default boundary tolerance in pixels for an image of ``shape`` (``H×W``…):
    ``max(1, round(0.0075 * diagonal))``, as in the DAVIS benchmark."""
    h, w = int(shape[0]), int(shape[1])
    return max(1, round(DAVIS_TOLERANCE_FRACTION * math.hypot(h, w)))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask: foreground pixels with a background 8-neighbour.

    The image frame is not a boundary (the border is replicated), so an object cut by the edge of
    the photo has no contour along it.
    """
    m = mask.astype(np.uint8)
    eroded = cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    return (m > 0) & (eroded == 0)


def _distance_to(boundary: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest ``True`` pixel of ``boundary``."""
    src = np.where(boundary, 0, 1).astype(np.uint8)
    return cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def boundary_f(pred: np.ndarray, truth: np.ndarray, tolerance_px: int | None = None) -> float:
    """Boundary F-measure of two 2-D binary masks (DAVIS "F").

    The boundary of a mask is its foreground pixels that touch the background (8-connectivity;
    the image frame does not count as background). Precision is the share of predicted boundary
    pixels within ``tolerance_px`` (Euclidean) of a true boundary pixel, recall the share of true
    boundary pixels within ``tolerance_px`` of a predicted one; the result is their harmonic mean
    (0.0 when both are 0). ``tolerance_px`` defaults to :func:`boundary_tolerance` of the shape.

    Empty cases: a mask has no boundary exactly when it is uniform (all background or all
    foreground). Both without boundary → 1.0 if the masks are equal, else 0.0; exactly one
    without boundary → 0.0 (a contour was missed or invented).

    Raises ``ValueError`` when the shapes differ, the masks are not 2-D (a trailing channel of
    size 1 is dropped) or ``tolerance_px`` is negative.
    """
    p, t = squeeze_channel(np.asarray(pred)), squeeze_channel(np.asarray(truth))
    _check_same_shape(p, t, "boundary_f")
    if p.ndim != 2:
        raise ValueError(f"boundary_f needs 2-D masks, got shape {p.shape}")
    if tolerance_px is None:
        tolerance_px = boundary_tolerance(p.shape)
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    p, t = as_binary(p), as_binary(t)
    pb, tb = _boundary(p), _boundary(t)
    n_pred, n_truth = int(np.count_nonzero(pb)), int(np.count_nonzero(tb))
    if n_pred == 0 and n_truth == 0:
        return 1.0 if np.array_equal(p, t) else 0.0
    if n_pred == 0 or n_truth == 0:
        return 0.0
    limit = float(tolerance_px) + 1e-4
    precision = np.count_nonzero(_distance_to(tb)[pb] <= limit) / n_pred
    recall = np.count_nonzero(_distance_to(pb)[tb] <= limit) / n_truth
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


@dataclass(frozen=True)
class ImageScore:
    """Scores of one evaluated image: its stem, product cluster, IoU, MAE and boundary F."""

    stem: str
    cluster: str
    iou: float
    mae: float
    boundary_f: float


def summarise(
    scores: Sequence[ImageScore],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    worst: int = 16,
) -> dict:
    """Aggregate per-image scores into the seed's evaluation table.

    Returns a dict with
      ``n``: number of images; ``mean_iou``, ``mean_mae``, ``mean_boundary_f``: plain means;
      ``share_at_least``: ``{threshold: share of images with IoU >= threshold}`` (fractions);
      ``clusters``: ``{cluster: {"n": count, "mean_iou": mean}}`` ordered by cluster name;
      ``worst``: up to ``worst`` dicts ``{"stem", "cluster", "iou"}``, lowest IoU first (ties by
      stem).

    Raises ``ValueError`` for an empty ``scores``, a threshold outside ``(0, 1]`` or a negative
    ``worst``.
    """
    if not scores:
        raise ValueError("summarise needs at least one ImageScore")
    if worst < 0:
        raise ValueError(f"worst must be >= 0, got {worst}")
    for th in thresholds:
        if not 0 < th <= 1:
            raise ValueError(f"IoU thresholds must lie in (0, 1], got {th}")
    ious = np.array([s.iou for s in scores], dtype=np.float64)
    by_cluster: dict[str, list[float]] = {}
    for s in scores:
        by_cluster.setdefault(s.cluster, []).append(s.iou)
    ranked = sorted(scores, key=lambda s: (s.iou, s.stem))[:worst]
    return {
        "n": len(scores),
        "mean_iou": float(ious.mean()),
        "share_at_least": {float(th): float(np.mean(ious >= th)) for th in thresholds},
        "mean_mae": float(np.mean([s.mae for s in scores])),
        "mean_boundary_f": float(np.mean([s.boundary_f for s in scores])),
        "clusters": {
            name: {"n": len(vals), "mean_iou": float(np.mean(vals))}
            for name, vals in sorted(by_cluster.items(), key=lambda kv: str(kv[0]))
        },
        "worst": [{"stem": s.stem, "cluster": s.cluster, "iou": float(s.iou)} for s in ranked],
    }


def _threshold_label(th: float) -> str:
    return f"≥{th * 100:g} %"


def format_summary(summary: dict) -> str:
    """Render a :func:`summarise` result as a plain-text table.

    First line: ``n 7 | mean IoU 99.435 % | ≥95 %: 99.3 % | ≥97 %: 98.7 % | ≥99 %: 93.1 %`` (mean
    IoU with 3 decimals, shares with 1); then mean MAE and boundary F, a per-cluster block
    (count and mean IoU) and the worst images.
    """
    head = [f"n {summary['n']}", f"mean IoU {summary['mean_iou'] * 100:.3f} %"]
    head += [f"{_threshold_label(th)}: {share * 100:.1f} %" for th, share in summary["share_at_least"].items()]
    lines = [
        " | ".join(head),
        f"mean MAE {summary['mean_mae']:.4f} | mean boundary F {summary['mean_boundary_f']:.4f}",
    ]
    clusters = summary["clusters"]
    if clusters:
        width = max(len("cluster"), *(len(str(c)) for c in clusters))
        lines += ["", "per cluster:", f"  {'cluster':<{width}}  {'n':>6}  {'mean IoU':>10}"]
        for name, row in clusters.items():
            lines.append(f"  {str(name):<{width}}  {row['n']:>6d}  {row['mean_iou'] * 100:>8.3f} %")
    if summary["worst"]:
        lines += ["", f"worst {len(summary['worst'])}:"]
        for row in summary["worst"]:
            lines.append(f"  {row['stem']}  ({row['cluster']})  IoU {row['iou'] * 100:.3f} %")
    return "\n".join(lines)
