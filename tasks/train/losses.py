"""Segmentation losses for deep supervision: BCE (U2-Net's own), soft IoU and SSIM (BASNet's
hybrid loss, Qin et al. 2019), combined by name.

``LOSSES`` lists the names :class:`~tasks.train.config.TrainConfig.loss` accepts: ``"bce"``
(per-pixel cross-entropy), ``"bce+iou"`` (plus a map-level soft IoU, which weighs the object as a
whole and so favours complete masks) and ``"bce+iou+ssim"`` (plus a patch-level structural term,
which weighs edges). Every term takes logits and a target in [0, 1] of shape B×1×H×W and returns
a float32 scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.train.config import LOSSES

__all__ = ["LOSSES", "soft_iou_loss", "ssim_loss", "segmentation_loss"]


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


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, name: str = "bce") -> torch.Tensor:
    """The loss ``name`` (one of :data:`LOSSES`) of one logit map against ``target``. Raises
    ``ValueError`` for another name."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    target = target.float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    if "iou" in name:
        loss = loss + soft_iou_loss(logits, target)
    if "ssim" in name:
        loss = loss + ssim_loss(logits, target)
    return loss
