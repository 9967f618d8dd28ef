"""The quality gate a challenger model must pass before it may become the champion.

Three checks, all on the same test split (the challenger and the champion are evaluated in the
same task, see :func:`tasks.evaluation.assessment.assess_challenger`):

1. ``mean_iou``: the challenger's mean IoU is at least ``iou_gate``;
2. ``cluster_iou``: every product cluster's mean IoU is at least ``cluster_iou_gate``
   (clusters with fewer than ``min_cluster_images`` test images are reported, not judged);
3. ``champion``: the challenger's mean IoU is not below the champion's by more than
   ``tolerance`` (skipped, and passed, when there is no champion yet);
4. ``best_champion``: nor below the best mean IoU a champion since the last intervention by hand
   had on the same test pairs (:func:`tasks.registry.best_champion`) by more than ``tolerance``, so
   that the tolerance bounds the whole decline over many promotions, not each step of it (checked
   only when that record is above the champion's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GateConfig", "GateDecision", "decide", "format_decision"]


@dataclass(frozen=True)
class GateConfig:
    """Gate thresholds, as fractions (0.97 means 97 % IoU).

    ``iou_gate``: least mean IoU; ``cluster_iou_gate``: least mean IoU of every cluster;
    ``tolerance``: how far the challenger's mean IoU may fall below the champion's;
    ``min_cluster_images``: clusters with fewer test images are not judged (too noisy).
    The defaults are the production gate (the training DAG's form starts from them).
    """

    iou_gate: float = 0.97
    cluster_iou_gate: float = 0.95
    tolerance: float = 0.002
    min_cluster_images: int = 1

    def __post_init__(self) -> None:
        for name in ("iou_gate", "cluster_iou_gate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1] (a fraction: 0.97 is 97 %), got {value!r}")
        if not 0 <= self.tolerance <= 1:
            raise ValueError(f"tolerance must lie in [0, 1], got {self.tolerance!r}")
        if self.min_cluster_images < 1:
            raise ValueError(f"min_cluster_images must be >= 1, got {self.min_cluster_images!r}")


@dataclass
class GateDecision:
    """The gate's verdict: ``passed``, one line per failed check in ``reasons``, and every check
    as ``{"name", "passed", "value", "limit", "detail"}`` in ``checks``."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the decision as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def _pct(value: float) -> str:
    return f"{value * 100:.3f} %"


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, config: GateConfig,
           record: dict[str, Any] | None = None) -> GateDecision:
    """Judge a challenger against the thresholds and the champion.

    Args:
        challenger: :func:`tasks.evaluation.metrics.summarise` output for the challenger on the test split
            (needs ``mean_iou`` and ``clusters``).
        champion: the same for the current champion on the same split, or None when there is no
            champion yet.
        config: the thresholds.
        record: ``{"version", "mean_iou"}`` of the earlier champion that scored best on the same test
            photos (:func:`tasks.registry.best_champion`), or None.

    Returns a :class:`GateDecision`. Raises ``ValueError`` when the two summaries were measured
    on different numbers of images (they must share the test split).
    """
    checks: list[dict[str, Any]] = []
    mean = float(challenger["mean_iou"])
    checks.append({"name": "mean_iou", "passed": mean >= config.iou_gate, "value": mean, "limit": config.iou_gate,
                   "detail": f"mean IoU {_pct(mean)} vs gate {_pct(config.iou_gate)}"})
    for cluster, row in challenger.get("clusters", {}).items():
        value, n = float(row["mean_iou"]), int(row["n"])
        judged = n >= config.min_cluster_images
        checks.append({"name": f"cluster_iou:{cluster}", "passed": (value >= config.cluster_iou_gate) or not judged,
                       "value": value, "limit": config.cluster_iou_gate,
                       "detail": f"cluster {cluster} ({n} images) mean IoU {_pct(value)} vs gate "
                                 f"{_pct(config.cluster_iou_gate)}" + ("" if judged else " (too few images: not judged)")})
    if champion is None:
        checks.append({"name": "champion", "passed": True, "value": mean, "limit": None,
                       "detail": "no champion yet: nothing to compare with"})
    else:
        if int(champion["n"]) != int(challenger["n"]):
            raise ValueError(f"the champion was evaluated on {champion['n']} images and the challenger on "
                             f"{challenger['n']}: both must be scored on the same test split")
        best = float(champion["mean_iou"])
        limit = best - config.tolerance
        checks.append({"name": "champion", "passed": mean >= limit, "value": mean, "limit": limit,
                       "detail": f"challenger {_pct(mean)} vs champion {_pct(best)} "
                                 f"(tolerance {config.tolerance * 100:.3f} points)"})
    held = None if champion is None else float(champion["mean_iou"])
    if record is not None and (held is None or float(record["mean_iou"]) > held):
        limit = float(record["mean_iou"]) - config.tolerance
        checks.append({"name": "best_champion", "passed": mean >= limit, "value": mean, "limit": limit,
                       "detail": f"challenger {_pct(mean)} vs {_pct(float(record['mean_iou']))} of version "
                                 f"{record['version']}, the best champion so far on these test photos (tolerance "
                                 f"{config.tolerance * 100:.3f} points in all, not per promotion)"})
    reasons = [c["detail"] for c in checks if not c["passed"]]
    return GateDecision(passed=not reasons, reasons=reasons, checks=checks)


def format_decision(decision: GateDecision) -> str:
    """Render a decision as lines: ``gate PASSED``/``gate FAILED`` then one ✓/✗ line per check."""
    lines = [f"gate {'PASSED' if decision.passed else 'FAILED'}"]
    lines += [f"  {'✓' if c['passed'] else '✗'} {c['detail']}" for c in decision.checks]
    return "\n".join(lines)
