"""The data stages' settings: plain dataclasses, no image or learning libraries.

Each is a DAG's ``Param`` group (:mod:`bgremoval_airflow.params.training` reads their defaults, so
a default is written once) and each stage module re-exports its own: :class:`CleaningConfig`
(:mod:`tasks.data.cleaning`), :class:`ClusteringConfig` (:mod:`tasks.data.clustering`),
:class:`SplitConfig` (:mod:`tasks.data.splits`), :class:`AugmentConfig` (:mod:`tasks.data.augment`).
Importing this module stays cheap enough for DAG parsing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tasks.core.limits import ASPECT_TOLERANCE, MAX_PIXELS

#: The largest corrected mask a reviewer may upload for a flagged pair.
MAX_FIXED_MASK_BYTES = 20 * 2**20

__all__ = ["AugmentConfig", "CleaningConfig", "ClusteringConfig", "SplitConfig"]


@dataclass(frozen=True)
class CleaningConfig:
    """Cleaning thresholds; each one is a DAG ``Param`` of ``bgremoval_training``.

    ``audit_masks``: run the mask audit (:mod:`tasks.data.mask_audit`) on every clean pair and
    record its reasons in the manifest's ``audit_reasons`` (flagged pairs then wait for a reviewer
    and stay out of training and the test split unless kept or fixed).
    """

    working_size: int = 320
    max_pixels: int = MAX_PIXELS
    min_side: int = 32
    mask_threshold: int = 128
    ambiguous_band: tuple[int, int] = (16, 240)
    max_ambiguous_fraction: float = 0.05
    min_foreground: float = 0.001
    max_foreground: float = 0.995
    max_aspect_mismatch: float = ASPECT_TOLERANCE
    jpeg_quality: int = 95
    audit_masks: bool = True

    def __post_init__(self) -> None:
        if self.working_size < 32:
            raise ValueError(f"working_size must be at least 32 px, got {self.working_size}")
        low, high = self.ambiguous_band
        if not 0 <= low < self.mask_threshold < high <= 255:
            raise ValueError(
                f"ambiguous_band {self.ambiguous_band} must surround mask_threshold {self.mask_threshold} within 0..255"
            )
        if not 0.0 <= self.min_foreground < self.max_foreground <= 1.0:
            raise ValueError("need 0 <= min_foreground < max_foreground <= 1")

    def to_dict(self) -> dict:
        """Return the config as a JSON-friendly dict (it feeds the dataset version hash)."""
        return asdict(self)


@dataclass(frozen=True)
class ClusteringConfig:
    """k-means settings: number of clusters, random seed and number of restarts."""

    k: int = 6
    seed: int = 0
    n_init: int = 10

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.n_init < 1:
            raise ValueError(f"n_init must be at least 1, got {self.n_init}")

    def to_dict(self) -> dict:
        """Return the config as a JSON-friendly dict."""
        return asdict(self)


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of each split (non-negative, summing to one) and the hash seed."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        fractions = self.fractions()
        if any(f < 0 for f in fractions):
            raise ValueError(f"split fractions must be >= 0, got {fractions}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {sum(fractions):.6f}")

    def fractions(self) -> tuple[float, float, float]:
        """``(train, val, test)``."""
        return (float(self.train), float(self.val), float(self.test))


@dataclass(frozen=True)
class AugmentConfig:
    """How many train samples each cluster should reach, the seed, and how often each op is used.

    ``p_side_by_side`` and ``p_place`` are the shares of samples built from two pairs (exclusive,
    so they sum to at most 1); the other ``p_*`` are independent chances of each op. A sample drawn
    with no op at all gets a new background. ``working_size`` (longer side of the outputs) defaults
    to the dataset's own.
    """

    target_per_cluster: int = 200
    seed: int = 0
    p_crop: float = 0.5
    p_flip: float = 0.5
    p_side_by_side: float = 0.15
    p_place: float = 0.2
    p_background: float = 0.6
    p_jitter: float = 0.6
    working_size: int | None = None
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if self.target_per_cluster < 0:
            raise ValueError(f"target_per_cluster must be >= 0, got {self.target_per_cluster}")
        names = ("p_crop", "p_flip", "p_side_by_side", "p_place", "p_background", "p_jitter")
        chances = {k: getattr(self, k) for k in names}
        bad = {k: v for k, v in chances.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"op chances must be in [0, 1]: {bad}")
        if self.p_side_by_side + self.p_place > 1.0:
            raise ValueError("p_side_by_side + p_place must be at most 1")
        if self.working_size is not None and self.working_size < 32:
            raise ValueError(f"working_size must be at least 32 px, got {self.working_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be between 1 and 100")
