"""The U2-Net family, written in this project: registry, model and building blocks.

``build_model("u2net")`` gives the full network (44.0 M parameters), ``build_model("u2netp")``
the small one (1.13 M). Both return logits; see :class:`tasks.model.u2net.U2Net`.
"""

from __future__ import annotations

import difflib

from torch import nn

from tasks.model.blocks import RSU, RSU4, RSU4F, RSU5, RSU6, RSU7, ConvBNReLU
from tasks.model.u2net import (
    MIN_INPUT_SIZE,
    TRAINING_SIZE,
    U2NET_CONFIG,
    U2NETP_CONFIG,
    StageWidths,
    U2Net,
    U2NetConfig,
    U2NetOutput,
)

__all__ = [
    "MIN_INPUT_SIZE",
    "MODEL_NAMES",
    "RSU",
    "RSU4",
    "RSU4F",
    "RSU5",
    "RSU6",
    "RSU7",
    "TRAINING_SIZE",
    "ConvBNReLU",
    "StageWidths",
    "U2Net",
    "U2NetConfig",
    "U2NetOutput",
    "build_model",
    "count_parameters",
]

_CONFIGS: dict[str, U2NetConfig] = {"u2net": U2NET_CONFIG, "u2netp": U2NETP_CONFIG}

#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = ("u2net", "u2netp")


def build_model(name: str, in_channels: int = 3, out_channels: int = 1) -> U2Net:
    """Build a freshly initialised model by name.

    Args:
        name: one of :data:`MODEL_NAMES`: ``"u2net"`` or ``"u2netp"`` (case, ``-`` and ``_`` are
            ignored, so ``"U2-NetP"`` works).
        in_channels: channels of the input image (3 for RGB).
        out_channels: channels of each output logit map (1 for a foreground mask).

    Returns the :class:`U2Net`, in training mode on the CPU. Raises ``ValueError`` for an
    unknown name, listing the valid ones and the closest match.
    """
    key = "".join(c for c in str(name).lower() if c not in "-_ ")
    if key not in _CONFIGS:
        valid = ", ".join(repr(n) for n in MODEL_NAMES)
        close = difflib.get_close_matches(key, MODEL_NAMES, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model name {name!r}: choose one of {valid}{hint}")
    return U2Net(_CONFIGS[key], in_channels=in_channels, out_channels=out_channels)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameters in ``model`` (only those with ``requires_grad`` when
    ``trainable_only``). Buffers such as BatchNorm running statistics are not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
