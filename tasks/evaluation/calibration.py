"""Calibrate what production needs to know about a trained model, on its dataset's splits: the
quality threshold and whether its cut-outs are published with edge refinement.

The quality score (:func:`tasks.serving.quality.quality_score`) is computed from the prediction alone; to
route well it must be tied to the IoU it stands for. :func:`calibrate_model` scores the model on
the validation split (score and true IoU per image), picks the threshold below which images go to
people so that those whose IoU would fall below ``target_iou`` are caught
(:func:`tasks.serving.quality.calibrate_threshold`), writes it as ``quality.json`` next to ``model.pt`` —
it travels into the registry with the model — and reports how that threshold routes the test split,
as a whole and per cluster (people photos and packshots are routed very differently).

The same validation pairs decide the edge refinement (:mod:`tasks.model.refine_choice`): each map is
scored as the network gave it and refined on the photo, and ``refinement.json`` records whether the
refined maps scored better by more than the noise. The threshold is then calibrated on the IoU of what
will be published.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tasks.core import layout
from tasks.core.heap import keep_freed_memory
from tasks.core.codecs import read_image, read_mask
from tasks.evaluation.metrics import MASK_THRESHOLD, iou, resize_to_original
from tasks.model.refine import RefineConfig, map_at_photo
from tasks.model.refine_choice import RefineChoice, choose_refinement, save_refine_choice
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

__all__ = ["MIN_CALIBRATION_IMAGES", "QualityPoint", "calibrate_model", "score_quality"]

#: Below this many images the calibration says its threshold is only a rough guide.
MIN_CALIBRATION_IMAGES = 30


@dataclass(frozen=True)
class QualityPoint:
    """One image's quality score, its true IoU (the network's map, resized) and its cluster;
    ``refined_iou``: the IoU of the map refined on the photo, when it was measured."""

    stem: str
    score: float
    iou: float
    cluster: str = "all"
    refined_iou: float | None = None

    def published_iou(self, refine: bool) -> float:
        """The IoU of the map as published with or without refinement."""
        if refine and self.refined_iou is None:
            raise ValueError(f"{self.stem}: the refined map was not scored")
        return float(self.refined_iou) if refine else self.iou


def score_quality(model_url: str, dataset_url: str, split: str, storage_options: dict | None = None,
                  batch_size: int = 8, threshold: float = MASK_THRESHOLD,
                  refine: RefineConfig | None = None) -> list[QualityPoint]:
    """Score every clean pair of ``split``: the quality score from the prediction (with the side
    outputs, on the photo's own box when the model letterboxes, as production scores it) and the IoU
    against the true mask at the mask's resolution; with ``refine`` also the
    IoU of the map refined on the photo (the network runs once). Returns one
    :class:`QualityPoint` per pair (an empty list for an empty split)."""
    from tasks.model.preprocess import prepare_input
    from tasks.serving.engines import TorchEngine, unletterboxed

    rows = load_samples(dataset_url, split, storage_options, include_augmented=False)
    if not rows:
        return []
    engine = TorchEngine(model_url, device="cpu", storage_options=storage_options)
    keep_freed_memory()  # a scoring pass on the CPU: 1.6-1.8x faster (tasks.core.heap)
    points = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = [read_image(r[1], storage_options) for r in chunk]
        masks = [read_mask(r[2], storage_options) for r in chunk]
        batch = np.stack([prepare_input(im, engine.input_size, engine.resize, engine.mean, engine.std) for im in images])
        probs, sides = engine.predict(batch)
        for i, (row, mask) in enumerate(zip(chunk, masks)):
            prob, side = unletterboxed(probs[i], None if sides is None else sides[i], engine, *images[i].shape[:2])
            score = quality_score(prob, side).score
            size, truth = (mask.shape[1], mask.shape[0]), mask > 127
            full = resize_to_original(prob, size)
            refined = None if refine is None else map_at_photo(prob, images[i], engine.input_size, refine, size)
            points.append(QualityPoint(stem=row[0], score=float(score), iou=iou(full > threshold, truth),
                                       cluster=row[3],
                                       refined_iou=None if refined is None else iou(refined > threshold, truth)))
    return points


def calibrate_model(model_url: str, dataset_url: str, storage_options: dict | None = None,
                    target_iou: float = TARGET_IOU, target_recall: float = TARGET_RECALL,
                    refine: RefineConfig = RefineConfig()) -> dict[str, Any]:
    """Calibrate the model at ``model_url`` (a training output folder, or its ``model.pt``) for production.

    Scores the ``val`` split (falls back to ``train`` when val is empty) plain and refined with
    ``refine``, writes the edge-refinement choice (``<model_url>/refinement.json``,
    :func:`tasks.model.refine_choice.choose_refinement`), chooses the routing threshold on the IoU
    of what will be published, writes ``<model_url>/quality.json`` and measures both on ``test``.
    Returns ``{"threshold", "target_iou", "target_recall", "calibrated_on", "val": RoutingReport dict,
    "test": RoutingReport dict or None, "test_by_cluster": {cluster: RoutingReport dict},
    "refinement": RefineChoice dict, "refinement_by_cluster": {cluster: the RefineChoice dict its pairs alone
    give}, "refinement_test": {"plain_mean_iou", "refined_mean_iou", "n"} or None,
    "text": a printable summary}``.
    """
    model_url = layout.model_folder(model_url)
    calibrated_on = "val"
    points = score_quality(model_url, dataset_url, "val", storage_options, refine=refine)
    if not points:
        calibrated_on, points = "train", score_quality(model_url, dataset_url, "train", storage_options, refine=refine)
    if not points:
        raise ValueError(f"{dataset_url} has no val or train pairs to calibrate on")
    choice = _refinement_of(points, calibrated_on, refine)
    choice_by_cluster = _refinement_by_cluster(points, calibrated_on, refine)
    published = [p.published_iou(choice.refine) for p in points]
    calibration = calibrate_threshold([p.score for p in points], published, target_iou, target_recall)
    save_refine_choice(choice, model_url, storage_options)
    save_calibration(calibration, model_url, storage_options)
    test = score_quality(model_url, dataset_url, "test", storage_options, refine=refine)
    test_report = routing_report([p.score for p in test], [p.published_iou(choice.refine) for p in test],
                                 calibration.threshold, target_iou) if test else None
    text = [f"edge refinement: {choice.describe()}"]
    if len(choice_by_cluster) > 1:
        text.append(f"  per cluster on {calibrated_on} (what each would choose alone; a model publishes one choice):")
        text += [_cluster_choice_line(name, c) for name, c in choice_by_cluster.items()]
    text += [f"quality threshold {calibration.threshold:.4f}, calibrated on {calibrated_on} ({len(points)} images) "
             f"to send images below {target_iou * 100:g} % IoU to people (target recall {target_recall:g})",
             calibration.report.format()]
    if calibration.note:
        text.append(f"note: {calibration.note}")
    if calibrated_on == "train":
        text.append("caution: the dataset has no val split, so the threshold was set on photos the model trained "
                    "on, where it scores better than on new ones: calibrate on a dataset version with a val split")
    if len(points) < MIN_CALIBRATION_IMAGES:
        text.append(f"caution: {len(points)} images are too few for a threshold to generalise "
                    f"(at least {MIN_CALIBRATION_IMAGES})")
    by_cluster, refinement_test = {}, None
    if test_report is not None:
        refinement_test = _refinement_figures(test)
        text += [f"on the test split ({len(test)} images): mean IoU refined "
                 f"{refinement_test['refined_mean_iou'] * 100:.3f} % vs plain {refinement_test['plain_mean_iou'] * 100:.3f} %",
                 "routing on the test split:", test_report.format()]
        by_cluster = _by_cluster(test, calibration.threshold, target_iou, choice)
        if len(by_cluster) > 1:
            text.append("per cluster:")
            text += [f"  {name:<12} n {r.n:>4d}, bad {r.n_bad:>4d} | routed {r.routed_share * 100:5.1f} % | "
                     f"recall {r.recall:.3f} | precision {r.precision:.3f} | bad among published "
                     f"{r.bad_published_share * 100:.1f} %" for name, r in by_cluster.items()]
    return {"threshold": calibration.threshold, "target_iou": target_iou, "target_recall": target_recall,
            "calibrated_on": calibrated_on, "val": calibration.report.to_dict(),
            "test": None if test_report is None else test_report.to_dict(),
            "test_by_cluster": {name: r.to_dict() for name, r in by_cluster.items()},
            "refinement": asdict(choice), "refinement_by_cluster": {name: asdict(c) for name, c in choice_by_cluster.items()},
            "refinement_test": refinement_test, "text": "\n".join(text)}


def _cluster_choice_line(name: str, choice: RefineChoice) -> str:
    gain = (choice.refined_mean_iou - choice.plain_mean_iou) * 100
    spread = "" if choice.gain_se is None else f" ± {choice.gain_se * 100:.3f}"
    return f"    {name:<12} {choice.n:>5d} pairs: gain {gain:+.3f}{spread} point ({'on' if choice.refine else 'off'})"


def _per_cluster(points: list[QualityPoint]) -> dict[str, list[QualityPoint]]:
    """The points of each cluster, clusters in name order."""
    return {c: [p for p in points if p.cluster == c] for c in sorted({p.cluster for p in points})}


def _refinement_of(points: list[QualityPoint], split: str, refine: RefineConfig = RefineConfig()) -> RefineChoice:
    """:func:`choose_refinement` on the points' plain and refined IoU."""
    return choose_refinement([p.iou for p in points], [p.published_iou(True) for p in points], split, refine)


def _refinement_by_cluster(points: list[QualityPoint], split: str, refine: RefineConfig) -> dict[str, RefineChoice]:
    """The refinement choice each cluster's pairs would make alone (people photos and packshots can
    disagree: ``benchmarks/README.md``, "A gain beyond the noise")."""
    return {c: _refinement_of(group, split, refine) for c, group in _per_cluster(points).items()}


def _refinement_figures(points: list[QualityPoint]) -> dict[str, float]:
    measured = _refinement_of(points, "test")
    return {"plain_mean_iou": measured.plain_mean_iou, "refined_mean_iou": measured.refined_mean_iou, "n": measured.n}


def _by_cluster(points: list[QualityPoint], threshold: float, target_iou: float,
                choice: RefineChoice) -> dict[str, RoutingReport]:
    return {c: routing_report([p.score for p in group], [p.published_iou(choice.refine) for p in group], threshold,
                              target_iou)
            for c, group in _per_cluster(points).items()}
