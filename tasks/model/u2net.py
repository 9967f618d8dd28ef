"""The U2-Net network (Qin et al. 2020), parameterised by its channel widths.

Six encoder stages (RSU-7, RSU-6, RSU-5, RSU-4, RSU-4F, RSU-4F) separated by 2×2 max-pools,
five decoder stages (RSU-4F, RSU-4, RSU-5, RSU-6, RSU-7) each fed with the upsampled deeper
map concatenated with the encoder skip, one 3×3 side convolution per decoder stage (and on the
bottom encoder stage), and a 1×1 convolution that fuses the six side maps, upsampled to the
input size. ``forward`` returns logits; apply ``torch.sigmoid`` for probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from tasks.model.blocks import RSU4, RSU4F, RSU5, RSU6, RSU7, upsample_like
from tasks.model.config import MIN_INPUT_SIZE, MODEL_NAMES, TRAINING_SIZE, U2NetConfig, model_config

__all__ = ["MODEL_NAMES", "U2Net", "U2NetOutput", "build_model", "count_parameters"]

class U2NetOutput(NamedTuple):
    """Logits of one forward pass, each B×out_channels×H×W at the input size.

    ``fused`` is the final prediction (the 1×1 fusion of the sides); ``sides`` holds the six
    side outputs, shallowest (stage 1d) first, used for deep supervision.
    """

    fused: Tensor
    sides: tuple[Tensor, ...]

    def all(self) -> tuple[Tensor, ...]:
        """Return the seven logit maps ``(fused, side1, …, side6)`` for a deep-supervised loss."""
        return (self.fused, *self.sides)


class U2Net(nn.Module):
    """U2-Net salient-object / foreground segmentation network.

    Args:
        config: channel widths, e.g. :data:`U2NET_CONFIG` or :data:`U2NETP_CONFIG`.
        in_channels: channels of the input image (3 for RGB).
        out_channels: channels of each output map (1 for a foreground mask).

    ``forward(x)`` takes a float tensor B×in_channels×H×W with H, W ≥ 32 and returns a
    :class:`U2NetOutput` of logits at H×W.
    """

    def __init__(self, config: U2NetConfig, in_channels: int = 3, out_channels: int = 1) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.config = config
        self.in_channels = in_channels
        self.out_channels = out_channels

        enc, dec = config.encoder, config.decoder
        encoder_types = (RSU7, RSU6, RSU5, RSU4, RSU4F, RSU4F)
        previous = in_channels
        for k, (block, widths) in enumerate(zip(encoder_types, enc, strict=True), start=1):
            self.add_module(f"stage{k}", block(previous, widths.mid, widths.out))
            previous = widths.out

        decoder_types = (RSU7, RSU6, RSU5, RSU4, RSU4F)
        # Build deepest first: stage kd takes the deeper map (stage 6 or stage (k+1)d) + skip k.
        deeper = enc[5].out
        for k in range(5, 0, -1):
            block, widths = decoder_types[k - 1], dec[k - 1]
            self.add_module(f"stage{k}d", block(deeper + enc[k - 1].out, widths.mid, widths.out))
            deeper = widths.out

        side_inputs = [d.out for d in dec] + [enc[5].out]
        for k, channels in enumerate(side_inputs, start=1):
            self.add_module(f"side{k}", nn.Conv2d(channels, out_channels, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_channels, out_channels, 1)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise all weights.

        Convolutions followed by ReLU get Kaiming-normal (fan-out) weights; the side and fusion
        heads, which produce logits, get variance-preserving (fan-in, linear) weights; all conv
        biases are zero, BatchNorm weights one and biases zero.
        """
        heads = {id(getattr(self, f"side{k}")) for k in range(1, 7)} | {id(self.outconv)}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if id(module) in heads:
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
                else:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.reset_running_stats()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"U2Net expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (for a single image add a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(
                "U2Net expects a 4-D tensor of shape (batch, channels, height, width), "
                f"got {x.dim()}-D shape {tuple(x.shape)}{hint}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"U2Net expects a floating-point tensor, got {x.dtype}; "
                "convert images with x.float() / 255 (and normalise as in training)"
            )
        channels = x.shape[1]
        if channels != self.in_channels:
            hint = ""
            if x.shape[-1] == self.in_channels:
                hint = "; the input looks channels-last (B×H×W×C): use x.permute(0, 3, 1, 2)"
            elif channels == 4 and self.in_channels == 3:
                hint = "; drop the alpha channel (x[:, :3]) or build the model with in_channels=4"
            raise ValueError(
                f"U2Net was built for {self.in_channels} input channels but got {channels} "
                f"(input shape {tuple(x.shape)}){hint}"
            )
        height, width = x.shape[-2:]
        if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
            raise ValueError(
                f"input of {height}×{width} px is too small: U2Net needs at least "
                f"{MIN_INPUT_SIZE}×{MIN_INPUT_SIZE} px (it pools 5 times); resize the image, e.g. "
                f"to {TRAINING_SIZE}×{TRAINING_SIZE} px, the training size"
            )
        if self.training and x.shape[0] == 1 and height <= MIN_INPUT_SIZE and width <= MIN_INPUT_SIZE:
            # The deepest maps are 1×1 here, and BatchNorm cannot take batch statistics of one value.
            raise ValueError(
                f"a training batch of one {height}×{width} px image leaves 1×1 px feature maps, "
                "which BatchNorm cannot normalise: use a batch of at least 2, larger images "
                f"(e.g. {TRAINING_SIZE}×{TRAINING_SIZE} px), or call model.eval() for inference"
            )

    def forward(self, x: Tensor) -> U2NetOutput:
        """Segment ``x`` (float, B×in_channels×H×W, H and W ≥ 32).

        Returns a :class:`U2NetOutput` of logits, each B×out_channels×H×W. Raises ``ValueError``
        or ``TypeError`` with a hint when the input's shape or dtype does not fit the model.
        """
        self._check_input(x)

        encoder: list[Tensor] = []
        hx = x
        for k in range(1, 7):
            if k > 1:
                hx = self.pool(hx)
            hx = getattr(self, f"stage{k}")(hx)
            encoder.append(hx)

        decoder: list[Tensor] = [encoder[5]]  # the bottom map feeds side 6
        hx = encoder[5]
        for k in range(5, 0, -1):
            skip = encoder[k - 1]
            hx = getattr(self, f"stage{k}d")(torch.cat((upsample_like(hx, skip), skip), dim=1))
            decoder.append(hx)
        decoder.reverse()  # now stage 1d … stage 5d, stage 6

        sides = tuple(
            upsample_like(getattr(self, f"side{k}")(feature), x)
            for k, feature in enumerate(decoder, start=1)
        )
        fused = self.outconv(torch.cat(sides, dim=1))
        return U2NetOutput(fused=fused, sides=sides)


def build_model(name: str, in_channels: int = 3, out_channels: int = 1) -> U2Net:
    """Build a freshly initialised model by name.

    Args:
        name: one of :data:`~tasks.model.config.MODEL_NAMES`: ``"u2net"`` or ``"u2netp"`` (case,
            ``-`` and ``_`` are ignored, so ``"U2-NetP"`` works).
        in_channels: channels of the input image (3 for RGB).
        out_channels: channels of each output logit map (1 for a foreground mask).

    Returns the :class:`U2Net`, in training mode on the CPU. Raises ``ValueError`` for an
    unknown name, listing the valid ones and the closest match.
    """
    return U2Net(model_config(name), in_channels=in_channels, out_channels=out_channels)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameters in ``model`` (only those with ``requires_grad`` when
    ``trainable_only``). Buffers such as BatchNorm running statistics are not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
