"""Quality of a predicted cut-out, judged from the prediction alone, and the routing threshold.

Production inference has no true mask, so each image gets a *quality score* in [0, 1] (higher =
better) computed from the model's own outputs at the network resolution:

* ``expected_iou``: the IoU the hard mask ``p > 0.5`` would reach if every pixel were foreground
  with its predicted probability ``p`` independently:
  ``Σ p·b / (Σ b + Σ p·(1 − b))`` with ``b = p > 0.5``. A crisp map scores ~1; a wide uncertain
  band (0.1 < p < 0.9) along the outline, or uncertain blobs, lowers it in proportion to the
  product's area, exactly as such errors lower the true IoU. An empty prediction scores 0;
* ``side_agreement`` (when the side outputs are available, see :mod:`tasks.model.export`): the mean
  IoU between the fused hard mask and the hard masks of the shallow side outputs
  (``QualityConfig.sides``). A trained U2-Net's sides agree with its fused map on clean
  products and disagree where it is unsure of the object itself.

``score = expected_iou × side_agreement ** side_weight``. The score is not an IoU estimate that
can be trusted as such; it is ranked, and :func:`calibrate_threshold` turns it into a decision on
a labelled set (predictions with true masks → IoU per image): images scoring below the threshold
go to people, the rest are published. :func:`routing_report` measures a threshold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tasks.core import layout, storage

__all__ = [
    "CALIBRATION_FILE",
    "Calibration",
    "QualityConfig",
    "QualityScore",
    "RoutingReport",
    "calibrate_threshold",
    "load_calibration",
    "quality_score",
    "routing_report",
    "save_calibration",
]

#: File name of the calibration saved next to a model (``<model folder>/quality.json``).
CALIBRATION_FILE = layout.CALIBRATION_FILE
#: The production target: a cut-out below this IoU should reach a person (the routing's "bad").
TARGET_IOU = 0.97
#: The share of bad cut-outs the calibrated threshold must route to people.
TARGET_RECALL = 0.9


@dataclass(frozen=True)
class QualityConfig:
    """How :func:`quality_score` combines its parts.

    ``sides``: indices (0 = shallowest) of the side outputs compared with the fused map;
    ``side_weight``: exponent of the side agreement in the score (0 ignores it);
    ``low``/``high``: the uncertain band reported as ``uncertain_share`` and ``band_px``.
    """

    sides: tuple[int, ...] = (0, 1, 2)
    side_weight: float = 1.0
    low: float = 0.1
    high: float = 0.9

    def __post_init__(self) -> None:
        if not 0 <= self.low < 0.5 < self.high <= 1:
            raise ValueError(f"need 0 <= low < 0.5 < high <= 1, got low={self.low} high={self.high}")
        if self.side_weight < 0:
            raise ValueError(f"side_weight must be >= 0, got {self.side_weight}")


@dataclass(frozen=True)
class QualityScore:
    """The score of one prediction and its parts.

    ``score`` (higher = better, in [0, 1]); ``expected_iou``; ``side_agreement`` (None without
    sides); ``uncertain_share``: pixels with low < p < high over the predicted foreground area (or 1 px);
    ``band_px``: the same pixels over the outline length (the uncertain band's mean width in
    network pixels); ``foreground_share``: predicted foreground over the whole map.
    """

    score: float
    expected_iou: float
    side_agreement: float | None
    uncertain_share: float
    band_px: float
    foreground_share: float

    def to_dict(self) -> dict[str, Any]:
        """Plain floats, for JSON and XCom."""
        return asdict(self)


def _outline_length(mask: np.ndarray) -> int:
    """Foreground pixels with a background 4-neighbour (the image frame is not background)."""
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1]
    touches = (~m[:-2, 1:-1]) | (~m[2:, 1:-1]) | (~m[1:-1, :-2]) | (~m[1:-1, 2:])
    return int(np.count_nonzero(inner & touches))


def _hard_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def quality_score(prob: np.ndarray, sides: np.ndarray | None = None,
                  config: QualityConfig = QualityConfig()) -> QualityScore:
    """Score one prediction.

    Args:
        prob: the fused foreground probabilities, ``H×W`` float in [0, 1] (best at the network
            resolution: cheap, and independent of the photo's size).
        sides: optional side probabilities ``K×H×W`` (the ONNX ``sides`` output), same ``H×W``.
        config: which sides count and how much.

    Returns a :class:`QualityScore`. Raises ``ValueError`` for maps of the wrong shape.
    """
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"prob must be a non-empty H×W map, got shape {p.shape}")
    b = p > 0.5
    area = int(np.count_nonzero(b))
    total = float(p.sum(dtype=np.float64))
    inside = float(p[b].sum(dtype=np.float64))
    union = area + (total - inside)
    expected = inside / union if area and union > 0 else 0.0  # nothing found: worst score
    uncertain = int(np.count_nonzero((p > config.low) & (p < config.high)))
    outline = _outline_length(b)
    agreement = None
    if sides is not None and config.sides:
        s = np.asarray(sides)
        if s.ndim != 3 or s.shape[1:] != p.shape:
            raise ValueError(f"sides must be K×{p.shape[0]}×{p.shape[1]}, got shape {s.shape}")
        chosen = [k for k in config.sides if k < s.shape[0]]
        if chosen:
            agreement = float(np.mean([_hard_iou(s[k] > 0.5, b) for k in chosen]))
    score = expected * (agreement ** config.side_weight if agreement is not None and config.side_weight else 1.0)
    return QualityScore(
        score=float(score),
        expected_iou=float(expected),
        side_agreement=agreement,
        uncertain_share=uncertain / max(area, 1),
        band_px=uncertain / outline if outline else 0.0,
        foreground_share=area / p.size,
    )


# ----------------------------------------------------------------------------------------------
# Routing and calibration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutingReport:
    """How a threshold routes a labelled set. "Positive" = a bad image (IoU < ``target_iou``);
    routed = ``score < threshold`` (sent to people), published = the rest.

    ``precision``: bad share of the routed images (1.0 when none is routed); ``recall``: routed
    share of the bad images (1.0 when there are none); ``routed_share``: routed share of all
    images; ``bad_published_share``: share of the published images that are bad.
    """

    threshold: float
    target_iou: float
    n: int
    n_bad: int
    true_positive: int   # bad and routed
    false_positive: int  # good but routed
    false_negative: int  # bad but published
    true_negative: int   # good and published
    precision: float
    recall: float
    routed_share: float
    bad_published_share: float

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, for JSON."""
        return asdict(self)

    def format(self) -> str:
        """A short plain-text confusion table."""
        return "\n".join([
            f"threshold {self.threshold:.4f} (bad = IoU < {self.target_iou:g}), n {self.n}, bad {self.n_bad}",
            "                 routed  published",
            f"  bad          {self.true_positive:>8d} {self.false_negative:>10d}",
            f"  good         {self.false_positive:>8d} {self.true_negative:>10d}",
            f"precision {self.precision:.3f} | recall {self.recall:.3f} | routed {self.routed_share * 100:.1f} % | "
            f"bad among published {self.bad_published_share * 100:.1f} %",
        ])


def _arrays(scores: Sequence[float], ious: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s, i = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    if s.ndim != 1 or s.shape != i.shape:
        raise ValueError(f"scores and ious must be 1-D and of equal length, got {s.shape} and {i.shape}")
    if s.size == 0:
        raise ValueError("need at least one (score, IoU) pair")
    if not (np.isfinite(s).all() and np.isfinite(i).all()):
        raise ValueError("scores and ious must be finite")
    return s, i


def routing_report(scores: Sequence[float], ious: Sequence[float], threshold: float,
                   target_iou: float = TARGET_IOU) -> RoutingReport:
    """Measure ``threshold`` on a labelled set: images with ``score < threshold`` are routed to
    people, bad images are those with ``IoU < target_iou``. Takes per-image scores and true IoUs
    (same order); returns a :class:`RoutingReport`. Raises ``ValueError`` on mismatched input."""
    s, i = _arrays(scores, ious)
    bad, routed = i < target_iou, s < threshold
    tp, fp = int(np.sum(bad & routed)), int(np.sum(~bad & routed))
    fn, tn = int(np.sum(bad & ~routed)), int(np.sum(~bad & ~routed))
    published = fn + tn
    return RoutingReport(
        threshold=float(threshold), target_iou=float(target_iou), n=int(s.size), n_bad=tp + fn,
        true_positive=tp, false_positive=fp, false_negative=fn, true_negative=tn,
        precision=tp / (tp + fp) if tp + fp else 1.0,
        recall=tp / (tp + fn) if tp + fn else 1.0,
        routed_share=(tp + fp) / s.size,
        bad_published_share=fn / published if published else 0.0,
    )


@dataclass(frozen=True)
class Calibration:
    """A routing threshold chosen on a labelled set: publish when ``score >= threshold``.

    ``report`` is the :class:`RoutingReport` of the threshold on that set; ``target_recall`` the
    recall of bad images asked for (always reachable: routing everything reaches recall 1);
    ``note`` explains special cases (no bad image; only routing everything reaches the target).
    """

    threshold: float
    target_iou: float
    target_recall: float
    report: RoutingReport
    note: str = ""
    quality_config: dict[str, Any] = field(default_factory=lambda: asdict(QualityConfig()))

    @property
    def precision(self) -> float:
        """Bad share of the routed images on the calibration set."""
        return self.report.precision

    @property
    def recall(self) -> float:
        """Routed share of the bad images on the calibration set."""
        return self.report.recall

    def publish(self, score: float) -> bool:
        """True when an image with this quality score may be published without review."""
        return score >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the file :func:`save_calibration` writes)."""
        out = asdict(self)
        out["quality_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.quality_config.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Rebuild a calibration from :meth:`to_dict` output."""
        values = dict(data)
        values["report"] = RoutingReport(**values["report"])
        return cls(**values)

    def config(self) -> QualityConfig:
        """The :class:`QualityConfig` the scores were computed with."""
        values = dict(self.quality_config)
        if "sides" in values:
            values["sides"] = tuple(values["sides"])
        return QualityConfig(**values)


def calibrate_threshold(scores: Sequence[float], ious: Sequence[float], target_iou: float = TARGET_IOU,
                        target_recall: float = TARGET_RECALL,
                        quality_config: QualityConfig = QualityConfig()) -> Calibration:
    """Choose the publishing threshold on a labelled set.

    Candidates are the midpoints between consecutive distinct scores (plus one below the lowest,
    routing nothing, and one just above the highest, routing everything). Among the candidates
    whose recall of bad images (IoU < ``target_iou``) reaches ``target_recall``, the one with the
    best precision wins; ties go to the lower threshold (fewer images routed). When no image is
    bad the threshold routes nothing. Returns a :class:`Calibration`; raises ``ValueError`` for
    mismatched input or a target outside (0, 1].
    """
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must lie in (0, 1], got {target_recall}")
    if not 0 < target_iou <= 1:
        raise ValueError(f"target_iou must lie in (0, 1], got {target_iou}")
    s, i = _arrays(scores, ious)
    cfg = asdict(quality_config)
    distinct = np.unique(s)
    below = float(distinct[0] - 1.0)
    if not np.any(i < target_iou):
        return Calibration(threshold=below, target_iou=target_iou, target_recall=target_recall,
                           report=routing_report(s, i, below, target_iou), quality_config=cfg,
                           note="no image of the calibration set is below the target IoU: nothing is routed")
    above = float(np.nextafter(distinct[-1], np.inf))
    candidates = [below, *((distinct[:-1] + distinct[1:]) / 2).tolist(), above]
    reports = [routing_report(s, i, t, target_iou) for t in candidates]
    reaching = [r for r in reports if r.recall >= target_recall - 1e-12]
    best = max(reaching, key=lambda r: (r.precision, -r.threshold))
    note = "" if best.routed_share < 1 else "only routing every image reaches the target recall"
    return Calibration(threshold=best.threshold, target_iou=target_iou, target_recall=target_recall,
                       report=best, note=note, quality_config=cfg)


def save_calibration(calibration: Calibration, url: str, storage_options: dict | None = None) -> str:
    """Write ``calibration`` as JSON to ``url`` — a ``.json`` file, or a model folder (then
    ``<folder>/quality.json``). Returns the URL written."""
    if not url.endswith(".json"):
        url = storage.join(url, CALIBRATION_FILE)
    return storage.write_text(url, json.dumps(calibration.to_dict(), indent=2), storage_options)


def load_calibration(url: str, storage_options: dict | None = None) -> Calibration | None:
    """Read a calibration written by :func:`save_calibration` from a ``.json`` URL or a model
    folder; returns None when there is none."""
    if not url.endswith(".json"):
        url = storage.join(url, CALIBRATION_FILE)
    if not storage.exists(url, storage_options):
        return None
    return Calibration.from_dict(json.loads(storage.read_bytes(url, storage_options)))
