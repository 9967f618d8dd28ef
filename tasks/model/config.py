"""The U2-Net family's names, sizes and channel widths: plain data, no PyTorch.

What configuration, validation and the DAGs' forms need to know about the models without
importing the network (:mod:`tasks.model.u2net` builds it from these).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MIN_INPUT_SIZE",
    "PRETRAINED",
    "RESIZE_MODES",
    "MODEL_NAMES",
    "TRAINING_SIZE",
    "U2NET_CONFIG",
    "U2NETP_CONFIG",
    "StageWidths",
    "U2NetConfig",
    "model_config",
]

#: Smallest height/width the network takes: five 2× poolings bring 32 px down to 1 px.
MIN_INPUT_SIZE = 32
#: The resolution the paper (and this project) trains and infers at.
TRAINING_SIZE = 320


class StageWidths(NamedTuple):
    """Channel widths of one RSU stage: ``mid`` inside the block, ``out`` leaving it."""

    mid: int
    out: int


@dataclass(frozen=True)
class U2NetConfig:
    """Channel widths of a U2-Net.

    ``encoder`` holds the six encoder stages, shallowest first (stage 1 … stage 6).
    ``decoder`` holds the five decoder stages, also shallowest first (stage 1d … stage 5d).
    Input widths follow from these: encoder stage k takes stage k-1's output (stage 1 the
    image), decoder stage kd takes the deeper stage's output plus encoder stage k's output.
    """

    encoder: tuple[StageWidths, ...]
    decoder: tuple[StageWidths, ...]

    def __post_init__(self) -> None:
        if len(self.encoder) != 6 or len(self.decoder) != 5:
            raise ValueError(
                "U2NetConfig needs 6 encoder stages and 5 decoder stages, got "
                f"{len(self.encoder)} and {len(self.decoder)}"
            )
        for where, stages in (("encoder", self.encoder), ("decoder", self.decoder)):
            for i, stage in enumerate(stages, start=1):
                if len(stage) != 2 or min(stage) < 1:
                    raise ValueError(
                        f"{where} stage {i} must be (mid, out) with positive widths, got {stage!r}"
                    )


def _widths(*pairs: tuple[int, int]) -> tuple[StageWidths, ...]:
    return tuple(StageWidths(*p) for p in pairs)


#: Full U2-Net (44.0 M parameters for 3 → 1 channels).
U2NET_CONFIG = U2NetConfig(
    encoder=_widths((32, 64), (32, 128), (64, 256), (128, 512), (256, 512), (256, 512)),
    # The reference model's stage 1d uses mid 16, not 32; kept for its parameter count/weights.
    decoder=_widths((16, 64), (32, 64), (64, 128), (128, 256), (256, 512)),
)

#: Small U2-NetP (1.13 M parameters for 3 → 1 channels): every stage mid 16, out 64.
U2NETP_CONFIG = U2NetConfig(
    encoder=_widths(*[(16, 64)] * 6),
    decoder=_widths(*[(16, 64)] * 5),
)


#: How an image becomes the square input: stretched, or letterboxed (longer side fitted, centred);
#: :mod:`tasks.model.preprocess` does both.
RESIZE_MODES: tuple[str, ...] = ("stretch", "letterbox")

#: The name of the published U2-NetP weights wherever a start or a model is chosen by name
#: (``init_from="pretrained"``, ``bgremoval remove --model pretrained``); see :mod:`tasks.model.pretrained`.
PRETRAINED = "pretrained"

#: Names accepted by :func:`model_config` and :func:`tasks.model.u2net.build_model`.
MODEL_NAMES: tuple[str, ...] = ("u2net", "u2netp")
_CONFIGS: dict[str, U2NetConfig] = {"u2net": U2NET_CONFIG, "u2netp": U2NETP_CONFIG}


def model_config(name: str) -> U2NetConfig:
    """The channel widths of the model called ``name`` (one of :data:`MODEL_NAMES`; case, ``-``
    and ``_`` are ignored, so ``"U2-NetP"`` works). Raises ``ValueError`` for an unknown name,
    listing the valid ones and the closest match."""
    key = "".join(c for c in str(name).lower() if c not in "-_ ")
    if key not in _CONFIGS:
        valid = ", ".join(repr(n) for n in MODEL_NAMES)
        close = difflib.get_close_matches(key, MODEL_NAMES, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model name {name!r}: choose one of {valid}{hint}")
    return _CONFIGS[key]
