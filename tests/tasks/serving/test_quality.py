"""Tests for ``tasks.serving.quality``: the score on hand-made maps, routing on known IoUs, threshold
calibration on hand-made data and the JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.serving.quality import (
    Calibration,
    QualityConfig,
    calibrate_threshold,
    load_calibration,
    quality_score,
    routing_report,
    save_calibration,
)


def _square(size: int = 64, lo: int = 16, hi: int = 48, value: float = 1.0) -> np.ndarray:
    p = np.zeros((size, size), np.float32)
    p[lo:hi, lo:hi] = value
    return p


def test_crisp_map_scores_one_and_soft_band_scores_lower():
    crisp = quality_score(_square())
    assert crisp.score == pytest.approx(1.0) and crisp.expected_iou == pytest.approx(1.0)
    assert crisp.uncertain_share == 0 and crisp.band_px == 0 and crisp.side_agreement is None
    assert crisp.foreground_share == pytest.approx(32 * 32 / 64 ** 2)
    soft = _square()
    soft[12:52, 12:52] = np.maximum(soft[12:52, 12:52], 0.4)  # a 4-px band of 0.4 around it
    graded = quality_score(soft)
    # expected IoU = 1024 / (1024 + 0.4 * (1600 - 1024))
    assert graded.expected_iou == pytest.approx(1024 / (1024 + 0.4 * 576), rel=1e-6)
    assert graded.band_px == pytest.approx(576 / (4 * 31), rel=1e-6)  # band area / outline pixels
    assert graded.score < crisp.score


def test_empty_prediction_is_the_worst():
    assert quality_score(np.zeros((64, 64), np.float32)).score == 0.0
    assert quality_score(np.full((64, 64), 0.3, np.float32)).score == 0.0


def test_side_disagreement_lowers_the_score():
    fused = _square()
    agree = np.stack([_square()] * 6)
    half_square = _square()
    half_square[:, 32:] = 0
    disagree = np.stack([half_square] * 6)  # each side finds half the product
    assert quality_score(fused, agree).score == pytest.approx(1.0)
    half = quality_score(fused, disagree)
    assert half.side_agreement == pytest.approx(0.5) and half.score == pytest.approx(0.5)
    assert quality_score(fused, disagree, QualityConfig(side_weight=0)).score == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sides must be"):
        quality_score(fused, np.zeros((6, 32, 32), np.float32))


SCORES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
IOUS = [0.50, 0.80, 0.99, 0.90, 0.99, 0.98]  # bad (< 0.97): the 1st, 2nd and 4th


def test_routing_report_counts_the_confusion_matrix():
    report = routing_report(SCORES, IOUS, threshold=0.35)  # routes 0.1, 0.2, 0.3
    assert (report.true_positive, report.false_positive, report.false_negative, report.true_negative) == (2, 1, 1, 2)
    assert report.precision == pytest.approx(2 / 3) and report.recall == pytest.approx(2 / 3)
    assert report.routed_share == 0.5 and report.bad_published_share == pytest.approx(1 / 3)
    assert "precision 0.667" in report.format()
    nothing = routing_report(SCORES, IOUS, threshold=0.0)
    assert nothing.precision == 1.0 and nothing.recall == 0.0 and nothing.routed_share == 0
    with pytest.raises(ValueError, match="equal length"):
        routing_report([0.1], [0.5, 0.6], 0.3)


def test_calibration_picks_the_expected_threshold():
    full = calibrate_threshold(SCORES, IOUS, target_recall=0.9)
    assert full.threshold == pytest.approx(0.45)  # the lowest threshold routing all three bad ones
    assert full.recall == 1.0 and full.precision == pytest.approx(3 / 4)
    assert not full.publish(0.4) and full.publish(0.5)
    partial = calibrate_threshold(SCORES, IOUS, target_recall=0.6)
    assert partial.threshold == pytest.approx(0.25) and partial.precision == 1.0
    assert partial.recall == pytest.approx(2 / 3)
    strict = calibrate_threshold(SCORES, IOUS, target_iou=0.995, target_recall=1.0)
    assert strict.threshold > 0.6 and strict.report.routed_share == 1.0 and "every image" in strict.note
    clean = calibrate_threshold(SCORES, [0.99] * 6)
    assert clean.threshold < 0.1 and clean.report.routed_share == 0 and "nothing is routed" in clean.note


def test_calibration_round_trips_through_json(tmp_path):
    cal = calibrate_threshold(SCORES, IOUS, quality_config=QualityConfig(sides=(0,), side_weight=0.5))
    url = save_calibration(cal, str(tmp_path / "model"))
    assert url.endswith("model/quality.json")
    back = load_calibration(str(tmp_path / "model"))
    assert isinstance(back, Calibration) and back == Calibration.from_dict(cal.to_dict())
    assert back.threshold == cal.threshold and back.config() == QualityConfig(sides=(0,), side_weight=0.5)
    assert load_calibration(str(tmp_path / "nothing")) is None
