"""The retraining loop's settings: a plain dataclass, cheap to import (the DAG's form reads its defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tasks.data.config import CleaningConfig

#: The largest mask file a correction or the retraining pool takes (a binary PNG of a 100-megapixel
#: photo is far smaller); the web pages refuse larger uploads with this figure too.
MAX_MASK_BYTES = 25 * 2**20

#: Decisions on a queued photo that keep a mask of their own (the one it is published with).
PUBLISHED_DECISIONS = ("accepted", "corrected")

__all__ = ["MAX_MASK_BYTES", "PUBLISHED_DECISIONS", "RetrainingConfig"]


def _is_int(value) -> bool:
    """True for an int or an integral float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer()


@dataclass(frozen=True)
class RetrainingConfig:
    """Settings of the retraining loop (each a DAG ``Param`` of ``bgremoval_retraining``).

    ``min_new_pairs``: pool pairs needed before a new dataset is built; ``working_size``: the
    largest longer side of the cleaned pairs (the base's working size; smaller pairs keep their size); ``val_fraction``: share of new pairs that
    go to ``val`` (the rest to ``train``); ``seed``: the seed of that hash.
    """

    min_new_pairs: int = 50
    working_size: int = CleaningConfig.working_size
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.min_new_pairs) or self.min_new_pairs < 1:
            raise ValueError(f"min_new_pairs must be an integer >= 1, got {self.min_new_pairs!r}")
        if not _is_int(self.working_size) or self.working_size < 32:
            raise ValueError(f"working_size must be an integer >= 32 px, got {self.working_size!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {self.val_fraction!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("min_new_pairs", "working_size", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "val_fraction", float(self.val_fraction))

    def to_dict(self) -> dict:
        """The config as a JSON-friendly dict (it feeds the version hash)."""
        return asdict(self)

    def cleaning_config(self) -> CleaningConfig:
        """The cleaning config the new pairs are cleaned with (defaults but the working size)."""
        return CleaningConfig(working_size=self.working_size)
