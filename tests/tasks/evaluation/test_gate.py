"""Gate logic: pass; fail on the mean; fail on one cluster; fail against the champion."""

from __future__ import annotations

import pytest

from tasks.evaluation.gate import GateConfig, decide, format_decision


def _summary(mean: float, clusters: dict[str, tuple[int, float]], n: int = 10) -> dict:
    return {"n": n, "mean_iou": mean, "clusters": {c: {"n": k, "mean_iou": v} for c, (k, v) in clusters.items()}}


CONFIG = GateConfig(iou_gate=0.95, cluster_iou_gate=0.90, tolerance=0.002)
GOOD = _summary(0.97, {"shorts": (5, 0.96), "long_pants": (5, 0.98)})


def test_passes_without_a_champion():
    decision = decide(GOOD, None, CONFIG)
    assert decision.passed and decision.reasons == []
    assert [c["name"] for c in decision.checks] == ["mean_iou", "cluster_iou:shorts", "cluster_iou:long_pants", "champion"]
    assert "no champion yet" in decision.checks[-1]["detail"]


def test_passes_when_within_tolerance_of_the_champion():
    assert decide(GOOD, _summary(0.9715, {}), CONFIG).passed


def test_fails_on_the_mean():
    decision = decide(_summary(0.949, {"shorts": (10, 0.949)}), None, CONFIG)
    assert not decision.passed
    assert decision.reasons == ["mean IoU 94.900 % vs gate 95.000 %"]


def test_fails_on_one_cluster():
    decision = decide(_summary(0.97, {"shorts": (5, 0.899), "long_pants": (5, 0.99)}), None, CONFIG)
    assert not decision.passed
    assert decision.reasons == ["cluster shorts (5 images) mean IoU 89.900 % vs gate 90.000 %"]


def test_small_clusters_are_reported_but_not_judged():
    config = GateConfig(iou_gate=0.95, cluster_iou_gate=0.90, min_cluster_images=3)
    decision = decide(_summary(0.97, {"shorts": (2, 0.5), "long_pants": (8, 0.99)}), None, config)
    assert decision.passed
    assert "not judged" in decision.checks[1]["detail"]


def test_fails_against_the_champion():
    decision = decide(GOOD, _summary(0.9725, {}), CONFIG)
    assert not decision.passed
    assert decision.reasons == ["challenger 97.000 % vs champion 97.250 % (tolerance 0.200 points)"]
    assert "gate FAILED" in format_decision(decision) and "✗ challenger" in format_decision(decision)


def test_the_tolerance_bounds_the_decline_over_many_promotions():
    # Each champion 0.15 point below the one before passes against the champion alone; the best
    # champion so far on these test photos (97.4 %) bounds the whole decline.
    within_step = decide(GOOD, _summary(0.9715, {}), CONFIG, {"version": "3", "mean_iou": 0.974})
    assert not within_step.passed
    assert within_step.reasons == ["challenger 97.000 % vs 97.400 % of version 3, the best champion so far on these "
                                   "test photos (tolerance 0.200 points in all, not per promotion)"]
    assert decide(GOOD, _summary(0.9715, {}), CONFIG, {"version": "3", "mean_iou": 0.9719}).passed
    # a record no higher than the champion's adds no check; nor does one without a champion to beat it
    assert [c["name"] for c in decide(GOOD, _summary(0.97, {}), CONFIG, {"version": "3", "mean_iou": 0.97}).checks][-1] == "champion"
    assert not decide(GOOD, None, CONFIG, {"version": "1", "mean_iou": 0.98}).passed


def test_summaries_of_different_splits_cannot_be_compared():
    with pytest.raises(ValueError, match="same test split"):
        decide(GOOD, _summary(0.9, {}, n=11), CONFIG)


@pytest.mark.parametrize("field,value", [("iou_gate", 97), ("cluster_iou_gate", -0.1), ("tolerance", 2)])
def test_thresholds_are_fractions(field, value):
    with pytest.raises(ValueError, match=field):
        GateConfig(**{field: value})
