"""An exported ONNX file behind the ``nn.Module`` interface that scoring uses: ONNX Runtime
(:class:`tasks.serving.engines.OnnxEngine`) does the work; :func:`tasks.evaluation.scoring.load_model`
returns it for ``.onnx`` files."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.core import storage
from tasks.model.export import read_onnx_metadata
from tasks.serving.engines import OnnxEngine

__all__ = ["OnnxModule", "load_onnx_module"]


class OnnxModule(nn.Module):
    """An exported ONNX file (:mod:`tasks.model.export`) behind the ``nn.Module`` interface evaluation
    uses: ``forward`` runs ONNX Runtime on the CPU and returns logits ``B×1×S×S`` (the logit of
    the exported probabilities), so an exported model is scored exactly like a PyTorch one."""

    def __init__(self, onnx_path: str) -> None:
        super().__init__()
        self.engine = OnnxEngine(onnx_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, _ = self.engine.predict(x.detach().cpu().float().numpy())
        return torch.logit(torch.from_numpy(np.clip(probs, 1e-7, 1 - 1e-7)))[:, None]


def load_onnx_module(model_url: str, storage_options: dict | None) -> tuple[nn.Module, dict[str, Any]]:
    """An ``.onnx`` file at ``model_url`` as an :class:`OnnxModule` in eval mode, with the metadata
    :func:`tasks.model.io.load_model` gives for a ``model.pt`` (read from the file's own metadata)."""
    with tempfile.TemporaryDirectory(prefix="bgremoval-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(model_url, storage_options))
        meta = read_onnx_metadata(path)
        module = OnnxModule(path)  # the session holds the model in memory; the file may go
    return module.eval(), {"model": meta["model"] or None, "model_widths": None, "input_size": meta["input_size"],
                           "resize": meta["resize"], "model_url": model_url, "config_source": "onnx metadata"}
