"""Calibrate the production quality threshold of a trained model on its dataset's splits.

The quality score (:func:`tasks.serving.quality.quality_score`) is computed from the prediction alone; to
route well it must be tied to the IoU it stands for. :func:`calibrate_model` scores the model on
the validation split (score and true IoU per image), picks the threshold below which images go to
people so that those whose IoU would fall below ``target_iou`` are caught
(:func:`tasks.serving.quality.calibrate_threshold`), writes it as ``quality.json`` next to ``model.pt`` —
it travels into the registry with the model — and reports how that threshold routes the test split,
as a whole and per cluster (people photos and packshots are routed very differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.core.codecs import read_image, read_mask
from tasks.evaluation.metrics import iou, resize_to_original
from tasks.serving.quality import (
    TARGET_IOU,
    TARGET_RECALL,
    RoutingReport,
    calibrate_threshold,
    quality_score,
    routing_report,
    save_calibration,
)
from tasks.train.data import load_samples

__all__ = ["QualityPoint", "calibrate_model", "score_quality"]


@dataclass(frozen=True)
class QualityPoint:
    """One image's quality score, its true IoU and its cluster."""

    stem: str
    score: float
    iou: float
    cluster: str = "all"


def score_quality(model_url: str, dataset_url: str, split: str, storage_options: dict | None = None,
                  batch_size: int = 8, threshold: float = 0.5) -> list[QualityPoint]:
    """Score every clean pair of ``split``: the quality score from the prediction (with the side
    outputs) and the IoU against the true mask at the mask's resolution. Returns one
    :class:`QualityPoint` per pair (an empty list for an empty split)."""
    from tasks.model.preprocess import prepare_input
    from tasks.serving.engines import TorchEngine

    rows = load_samples(dataset_url, split, storage_options, include_augmented=False)
    if not rows:
        return []
    engine = TorchEngine(model_url, device="cpu", storage_options=storage_options)
    points = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = [read_image(r[1], storage_options) for r in chunk]
        masks = [read_mask(r[2], storage_options) for r in chunk]
        batch = np.stack([prepare_input(im, engine.input_size, engine.resize, engine.mean, engine.std) for im in images])
        probs, sides = engine.predict(batch)
        for i, (row, mask) in enumerate(zip(chunk, masks)):
            score = quality_score(probs[i], None if sides is None else sides[i]).score
            full = resize_to_original(probs[i], (mask.shape[1], mask.shape[0]))
            points.append(QualityPoint(stem=row[0], score=float(score), iou=iou(full > threshold, mask > 127),
                                       cluster=row[3]))
    return points


def calibrate_model(model_url: str, dataset_url: str, storage_options: dict | None = None,
                    target_iou: float = TARGET_IOU, target_recall: float = TARGET_RECALL) -> dict[str, Any]:
    """Calibrate the routing threshold of the model at ``model_url`` (a training output folder).

    Scores the ``val`` split (falls back to ``train`` when val is empty), chooses the threshold,
    writes ``<model_url>/quality.json`` and measures the routing on ``test``. Returns
    ``{"threshold", "target_iou", "target_recall", "calibrated_on", "val": RoutingReport dict,
    "test": RoutingReport dict or None, "test_by_cluster": {cluster: RoutingReport dict},
    "text": a printable summary}``.
    """
    calibrated_on = "val"
    points = score_quality(model_url, dataset_url, "val", storage_options)
    if not points:
        calibrated_on, points = "train", score_quality(model_url, dataset_url, "train", storage_options)
    if not points:
        raise ValueError(f"{dataset_url} has no val or train pairs to calibrate on")
    calibration = calibrate_threshold([p.score for p in points], [p.iou for p in points], target_iou, target_recall)
    save_calibration(calibration, model_url, storage_options)
    test = score_quality(model_url, dataset_url, "test", storage_options)
    test_report = routing_report([p.score for p in test], [p.iou for p in test], calibration.threshold,
                                 target_iou) if test else None
    text = [f"quality threshold {calibration.threshold:.4f}, calibrated on {calibrated_on} ({len(points)} images) "
            f"to send images below {target_iou * 100:g} % IoU to people (target recall {target_recall:g})",
            calibration.report.format()]
    if calibration.note:
        text.append(f"note: {calibration.note}")
    by_cluster = {}
    if test_report is not None:
        text += [f"routing on the test split ({len(test)} images):", test_report.format()]
        by_cluster = _by_cluster(test, calibration.threshold, target_iou)
        if len(by_cluster) > 1:
            text.append("per cluster:")
            text += [f"  {name:<12} n {r.n:>4d}, bad {r.n_bad:>4d} | routed {r.routed_share * 100:5.1f} % | "
                     f"recall {r.recall:.3f} | precision {r.precision:.3f} | bad among published "
                     f"{r.bad_published_share * 100:.1f} %" for name, r in by_cluster.items()]
    return {"threshold": calibration.threshold, "target_iou": target_iou, "target_recall": target_recall,
            "calibrated_on": calibrated_on, "val": calibration.report.to_dict(),
            "test": None if test_report is None else test_report.to_dict(),
            "test_by_cluster": {name: r.to_dict() for name, r in by_cluster.items()}, "text": "\n".join(text)}


def _by_cluster(points: list[QualityPoint], threshold: float, target_iou: float) -> dict[str, RoutingReport]:
    clusters = sorted({p.cluster for p in points})
    return {c: routing_report([p.score for p in points if p.cluster == c], [p.iou for p in points if p.cluster == c],
                              threshold, target_iou) for c in clusters}
