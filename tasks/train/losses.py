"""Segmentation losses for deep supervision: BCE (U2-Net's own), soft IoU and SSIM (BASNet's
hybrid loss, Qin et al. 2019) and F3Net's boundary-weighted BCE + IoU (Wei et al. 2020), combined
by name.

``LOSSES`` lists the names :class:`~tasks.train.config.TrainConfig.loss` accepts: ``"bce"``
(per-pixel cross-entropy), ``"bce+iou"`` (plus a map-level soft IoU, which weighs the object as a
whole and so favours complete masks) and ``"bce+iou+ssim"`` (plus a patch-level structural term,
which weighs edges) and ``"wbce+wiou"`` (F3Net's structure loss: BCE and IoU with each pixel
weighted by how far its local neighbourhood is from uniform, so the band along the outline counts up
to six times a pixel deep inside or outside the object). Every term takes logits and a target in [0, 1] of shape B×1×H×W and returns
a float32 scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tasks.train.config import LOSSES

__all__ = ["LOSSES", "boundary_weights", "segmentation_loss", "segmentation_losses", "soft_iou_loss", "ssim_loss",
           "structure_loss"]

#: The neighbourhood of :func:`boundary_weights` as a share of the map's height: 31 px at the 320 px
#: input (F3Net: 31 px at 352), so that a smaller input weighs the same band of the object.
BOUNDARY_WINDOW_SHARE = 31 / 320
#: The extra weight of a pixel on the outline (F3Net's).
BOUNDARY_GAIN = 5.0


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - Σ p·t / Σ (p + t - p·t)`` per image (``p = sigmoid(logits)``), averaged over the batch."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).flatten(1).sum(1)
    union = (p + t - p * t).flatten(1).sum(1)
    return (1 - (inter + 1.0) / (union + 1.0)).mean()


def ssim_loss(logits: torch.Tensor, target: torch.Tensor, window: int = 11) -> torch.Tensor:
    """``1 - SSIM`` between ``sigmoid(logits)`` and the target over ``window``-px patches (uniform
    window, the usual constants for a signal in [0, 1])."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    pad = window // 2
    mu_p = F.avg_pool2d(p, window, 1, pad, count_include_pad=False)
    mu_t = F.avg_pool2d(t, window, 1, pad, count_include_pad=False)
    var_p = F.avg_pool2d(p * p, window, 1, pad, count_include_pad=False) - mu_p * mu_p
    var_t = F.avg_pool2d(t * t, window, 1, pad, count_include_pad=False) - mu_t * mu_t
    cov = F.avg_pool2d(p * t, window, 1, pad, count_include_pad=False) - mu_p * mu_t
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return (1 - ssim).mean()


def boundary_weights(target: torch.Tensor, gain: float = BOUNDARY_GAIN) -> torch.Tensor:
    """``1 + gain·|mean of the target over a square around the pixel − target|`` (the square's side
    :data:`BOUNDARY_WINDOW_SHARE` of the height, odd): 1 far from the outline, up to ``1 + gain`` on it."""
    t = target.float()
    window = max(3, round(t.shape[-2] * BOUNDARY_WINDOW_SHARE) | 1)
    pad = window // 2
    # the square's mean as two one-dimensional means (the same numbers, 2·w instead of w² additions)
    rows = F.avg_pool2d(t, (window, 1), 1, (pad, 0), count_include_pad=False)
    local = F.avg_pool2d(rows, (1, window), 1, (0, pad), count_include_pad=False)
    return 1 + gain * (local - t).abs()


def structure_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """F3Net's loss: BCE and soft IoU, each pixel weighted by ``weights`` (default
    :func:`boundary_weights` of the target), per image, averaged over the batch."""
    t = target.float()
    weights = boundary_weights(t) if weights is None else weights
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    weighted_bce = (weights * bce).flatten(1).sum(1) / weights.flatten(1).sum(1)
    p = torch.sigmoid(logits.float())
    inter = (weights * p * t).flatten(1).sum(1)
    union = (weights * (p + t - p * t)).flatten(1).sum(1)
    weighted_iou = 1 - (inter + 1.0) / (union + 1.0)
    return (weighted_bce + weighted_iou).mean()


def segmentation_losses(maps: Sequence[torch.Tensor], target: torch.Tensor, name: str = "bce") -> list[torch.Tensor]:
    """The loss ``name`` of each logit map of ``maps`` against the same ``target`` (deep
    supervision); ``wbce+wiou``'s outline weights, which depend on the target alone, are computed
    once. Raises ``ValueError`` for a name not in :data:`LOSSES`."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    target = target.float()
    if name == "wbce+wiou":
        weights = boundary_weights(target)
        return [structure_loss(logits, target, weights) for logits in maps]
    return [_hybrid_loss(logits, target, name) for logits in maps]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, name: str = "bce") -> torch.Tensor:
    """The loss ``name`` (one of :data:`LOSSES`) of one logit map against ``target``. Raises
    ``ValueError`` for another name."""
    return segmentation_losses([logits], target, name)[0]


def _hybrid_loss(logits: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """BCE, plus the soft IoU and SSIM terms ``name`` names (``bce``, ``bce+iou``, ``bce+iou+ssim``)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    if "iou" in name:
        loss = loss + soft_iou_loss(logits, target)
    if "ssim" in name:
        loss = loss + ssim_loss(logits, target)
    return loss
