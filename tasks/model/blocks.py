"""Building blocks of the U2-Net family: ``ConvBNReLU`` and the residual U-blocks (RSU).

Architecture from Qin et al. 2020, "U2-Net: Going deeper with nested U-structure for salient
object detection". An RSU-L block is a small U-Net of height L inside a residual connection:

    x ─ in-conv ─┬─ conv1 ─ pool ─ conv2 ─ pool ─ … ─ conv(L-1) ─ conv(L, dilation 2)
                 │     │              │                  │              │
                 │   conv1d ◄ up ◄ conv2d ◄ … ◄ up ◄ conv(L-1)d ◄──── concat
                 └──────────────── + ────────────────────────────────────────► out

RSU-4F replaces pooling and upsampling by growing dilations (1, 2, 4, 8), for the two deepest
stages whose feature maps are already small.

Sub-module names (``rebnconvin``, ``rebnconv1`` … ``rebnconv1d``, ``conv_s1``, ``bn_s1``) follow
the authors' reference implementation, so the published state dicts load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RSU",
    "RSU4",
    "RSU4F",
    "RSU5",
    "RSU6",
    "RSU7",
    "ConvBNReLU",
    "upsample_like",
]


def upsample_like(src: Tensor, like: Tensor) -> Tensor:
    """Bilinearly resize ``src`` (B×C×h×w) to the spatial size of ``like``; returns B×C×H×W.

    Resizing to the skip's exact size (rather than by a factor of 2) is what lets odd input
    sizes work, since ``ceil_mode`` pooling rounds up.
    """
    if src.shape[-2:] == like.shape[-2:]:
        return src
    return F.interpolate(src, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Module):
    """3×3 convolution (with ``dilation``, same padding) → BatchNorm → ReLU ("REBNCONV").

    Takes B×``in_channels``×H×W, returns B×``out_channels``×H×W.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or dilation < 1:
            raise ValueError(
                f"ConvBNReLU needs positive in_channels, out_channels and dilation, got "
                f"{in_channels}, {out_channels} and {dilation}"
            )
        # The conv keeps its bias (redundant before BN) to match the reference parameter count
        # and state-dict layout.
        self.conv_s1 = nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_channels)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Apply conv → BN → ReLU to ``x`` (B×C_in×H×W); returns B×C_out×H×W."""
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """Residual U-block of height ``depth`` (4 to 7) with pooling ("RSU-L").

    Encoder: an input conv to ``out_channels``, then ``depth - 1`` convs at ``mid_channels``
    with a 2×2 max-pool (``ceil_mode=True``) between the first ``depth - 2`` of them, and a
    bottom conv with dilation 2. The decoder mirrors it with convs over the concatenation of the
    upsampled deeper map and the skip. The output is the decoder's last map plus the input
    conv's map.

    Takes B×``in_channels``×H×W (any H, W ≥ 1), returns B×``out_channels``×H×W.
    """

    def __init__(self, depth: int, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        if not 4 <= depth <= 7:
            raise ValueError(f"RSU depth must be between 4 and 7 (as in the paper), got {depth}")
        self.depth = depth
        self.rebnconvin = ConvBNReLU(in_channels, out_channels)
        self.add_module("rebnconv1", ConvBNReLU(out_channels, mid_channels))
        for i in range(2, depth):
            self.add_module(f"rebnconv{i}", ConvBNReLU(mid_channels, mid_channels))
        self.add_module(f"rebnconv{depth}", ConvBNReLU(mid_channels, mid_channels, dilation=2))
        for i in range(depth - 1, 1, -1):
            self.add_module(f"rebnconv{i}d", ConvBNReLU(2 * mid_channels, mid_channels))
        self.rebnconv1d = ConvBNReLU(2 * mid_channels, out_channels)
        self.pool = _pool()
        # Names, not a ModuleList, so each conv appears once in state_dict under its paper name.
        self._encoder_names = tuple(f"rebnconv{i}" for i in range(1, depth + 1))
        self._decoder_names = tuple(f"rebnconv{i}d" for i in range(depth - 1, 0, -1))

    def forward(self, x: Tensor) -> Tensor:
        """Run the block on ``x`` (B×C_in×H×W); returns B×C_out×H×W."""
        hxin = self.rebnconvin(x)
        skips: list[Tensor] = []
        hx = hxin
        for i, name in enumerate(self._encoder_names):
            if 0 < i < self.depth - 1:
                hx = self.pool(hx)
            hx = getattr(self, name)(hx)
            skips.append(hx)
        # skips[-1] is the dilated bottom conv; its partner is the map just above it.
        hx = skips.pop()
        for name in self._decoder_names:
            skip = skips.pop()
            hx = getattr(self, name)(torch.cat((upsample_like(hx, skip), skip), dim=1))
        return hx + hxin

    def extra_repr(self) -> str:
        return f"depth={self.depth}"


class RSU7(RSU):
    """RSU-7: residual U-block of height 7 (five poolings). Shapes as in :class:`RSU`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(7, in_channels, mid_channels, out_channels)


class RSU6(RSU):
    """RSU-6: residual U-block of height 6 (four poolings). Shapes as in :class:`RSU`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(6, in_channels, mid_channels, out_channels)


class RSU5(RSU):
    """RSU-5: residual U-block of height 5 (three poolings). Shapes as in :class:`RSU`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(5, in_channels, mid_channels, out_channels)


class RSU4(RSU):
    """RSU-4: residual U-block of height 4 (two poolings). Shapes as in :class:`RSU`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(4, in_channels, mid_channels, out_channels)


class RSU4F(nn.Module):
    """RSU-4F: height-4 residual U-block without pooling, using dilations 1, 2, 4, 8 instead.

    Takes B×``in_channels``×H×W, returns B×``out_channels``×H×W at the same resolution.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        self.rebnconvin = ConvBNReLU(in_channels, out_channels)
        self.rebnconv1 = ConvBNReLU(out_channels, mid_channels, dilation=1)
        self.rebnconv2 = ConvBNReLU(mid_channels, mid_channels, dilation=2)
        self.rebnconv3 = ConvBNReLU(mid_channels, mid_channels, dilation=4)
        self.rebnconv4 = ConvBNReLU(mid_channels, mid_channels, dilation=8)
        self.rebnconv3d = ConvBNReLU(2 * mid_channels, mid_channels, dilation=4)
        self.rebnconv2d = ConvBNReLU(2 * mid_channels, mid_channels, dilation=2)
        self.rebnconv1d = ConvBNReLU(2 * mid_channels, out_channels, dilation=1)

    def forward(self, x: Tensor) -> Tensor:
        """Run the block on ``x`` (B×C_in×H×W); returns B×C_out×H×W."""
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), dim=1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), dim=1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), dim=1))
        return hx1d + hxin
