"""Export a trained U2-Net to ONNX, the format production inference runs on CPUs.

The exported graph takes what :func:`tasks.model.preprocess.preprocess` produces — ``input``: float32
``B×3×S×S``, RGB scaled to [0, 1] and normalised with the ImageNet mean/std — and returns
``mask``: float32 ``B×1×S×S`` foreground probabilities (the sigmoid of the fused output), and by
default a second output ``sides``: float32 ``B×6×S×S``, the sigmoid of the six side outputs
(shallowest first), which :mod:`tasks.serving.quality` compares with the fused map. The batch axis is
dynamic; ``S`` is the model's training input size. Output 0 is what rembg's ``u2net_custom``
session reads (first output, channel 0), so the same file runs there.

The file carries its preprocessing as ONNX metadata (``input_size``, ``resize``, ``mean``, ``std``,
``model``), so :func:`read_onnx_metadata` tells an inference engine how to feed it.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.model.onnx_metadata import ONNX_INPUT, ONNX_OUTPUT, ONNX_SIDES, read_onnx_metadata
from tasks.model.preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ONNX_INPUT", "ONNX_OPSET", "ONNX_OUTPUT", "ONNX_SIDES", "ProbabilityHead", "export_onnx",
           "read_onnx_metadata"]

ONNX_OPSET = 18
TRACED_OPSET = 17  # the tracing exporter's opset (also what rembg's sessions are known to run)


class ProbabilityHead(nn.Module):
    """The fused logits through a sigmoid (and, with ``sides``, the six side maps concatenated
    on the channel axis): what an inference engine wants from U2-Net."""

    def __init__(self, model: nn.Module, sides: bool = False) -> None:
        super().__init__()
        self.model = model
        self.sides = sides

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        fused = out.fused if hasattr(out, "fused") else out[0] if isinstance(out, (tuple, list)) else out
        if not self.sides:
            return torch.sigmoid(fused)
        return torch.sigmoid(fused), torch.sigmoid(torch.cat([s[:, :1] for s in out.sides], dim=1))


def _has_sides(model: nn.Module, size: int) -> bool:
    """True when ``model`` returns a ``U2NetOutput`` with side outputs (checked on one image)."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, size, size))
    return bool(getattr(out, "sides", None))


def export_onnx(model: nn.Module, onnx_path: str, input_size: int, resize: str = "stretch",
                model_name: str | None = None, check: bool = True, tolerance: float = 1e-3,
                sides: bool | None = None, exporter: str = "torchscript") -> dict[str, Any]:
    """Write ``model`` as an ONNX file with a dynamic batch axis.

    Args:
        model: a U2-Net (any module returning ``U2NetOutput``, a tuple whose first item is the
            fused logits, or logits); exported on the CPU in eval mode (the caller's module is
            not changed: a copy is moved).
        onnx_path: local path of the ``.onnx`` file to write (its folder must exist).
        input_size: the square input size ``S`` the model was trained at.
        resize: the preprocessing resize mode (``"stretch"`` or ``"letterbox"``), stored as metadata.
        model_name: stored as metadata (e.g. ``"u2netp"``).
        check: run the file with ONNX Runtime on two random images and compare with PyTorch.
        tolerance: the largest absolute probability difference ``check`` accepts.
        sides: add the second output ``sides`` (B×6×S×S side probabilities); ``None`` (default)
            adds it when the model returns side outputs (a ``U2NetOutput``).
        exporter: ``"torchscript"`` (default: PyTorch's tracing exporter, about ten times faster
            than ``torch.export`` on this network — a second instead of ten for U2-NetP on 2 cores —
            and checked against PyTorch all the same) or ``"dynamo"`` (``torch.export``). When the
            tracing exporter is missing or fails, the dynamo exporter is used.

    Returns ``{"path", "opset", "input_size", "bytes", "max_abs_diff", "outputs", "exporter"}`` (``max_abs_diff`` is None
    without ``check``). Raises ``RuntimeError`` when ONNX Runtime disagrees with PyTorch by more
    than ``tolerance``.
    """
    import copy

    import onnx

    size = int(input_size)
    base = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    if sides is None:
        sides = _has_sides(base, size)
    wrapped = ProbabilityHead(base, sides=sides).eval()
    outputs = [ONNX_OUTPUT, ONNX_SIDES] if sides else [ONNX_OUTPUT]
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "model.onnx")
        exported = exporter == "torchscript" and _export_traced(wrapped, size, outputs, raw)
        if not exported:
            _export_dynamo(wrapped, size, outputs, raw)
        proto = onnx.load(raw)
    metadata = {"input_size": str(size), "resize": resize, "mean": json.dumps(list(IMAGENET_MEAN)),
                "std": json.dumps(list(IMAGENET_STD)), "model": model_name or "",
                "output": "probability of foreground, sigmoid of the fused output",
                "outputs": json.dumps(outputs)}
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, onnx_path)
    diff = _check_against_torch(wrapped, onnx_path, size) if check else None
    if diff is not None and diff > tolerance:
        raise RuntimeError(f"the ONNX export at {onnx_path} differs from PyTorch by {diff:.2e} (> {tolerance:.0e})")
    return {"path": onnx_path, "opset": TRACED_OPSET if exported else ONNX_OPSET, "input_size": size,
            "bytes": os.path.getsize(onnx_path), "max_abs_diff": diff, "outputs": outputs,
            "exporter": "torchscript" if exported else "dynamo"}


def _export_traced(wrapped: nn.Module, size: int, outputs: list[str], path: str) -> bool:
    """PyTorch's tracing exporter; False when it is unavailable or fails (the caller falls back)."""
    import warnings

    axes = {name: {0: "batch"} for name in [ONNX_INPUT, *outputs]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice and tracer warnings on shape checks
            torch.onnx.export(wrapped, (torch.zeros(1, 3, size, size),), path, input_names=[ONNX_INPUT],
                              output_names=outputs, dynamic_axes=axes, opset_version=TRACED_OPSET, dynamo=False)
    except Exception:  # noqa: BLE001 - any failure means: use torch.export instead
        return False
    return True


def _export_dynamo(wrapped: nn.Module, size: int, outputs: list[str], path: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(wrapped, (torch.zeros(1, 3, size, size),), path, input_names=[ONNX_INPUT], output_names=outputs,
                      dynamic_shapes={"x": {0: batch}}, opset_version=ONNX_OPSET, dynamo=True,
                      external_data=False, verbose=False)


def _check_against_torch(wrapped: nn.Module, onnx_path: str, size: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    got = session.run(None, {ONNX_INPUT: x})
    with torch.inference_mode():
        want = wrapped(torch.from_numpy(x))
    want = list(want) if isinstance(want, tuple) else [want]
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))
