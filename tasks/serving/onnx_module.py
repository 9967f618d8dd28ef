"""An inference engine behind the ``nn.Module`` interface that scoring uses.

:func:`tasks.evaluation.scoring.load_model` returns an :class:`EngineModule` around an
:class:`tasks.serving.engines.OnnxEngine` for ``.onnx`` files, and any engine can be scored the same
way, e.g. one with test-time flip (:class:`tasks.serving.engines.FlipAveragedEngine`): one
implementation of each inference option serves both the cut-outs and their evaluation."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.core import storage
from tasks.model.onnx_metadata import read_onnx_metadata
from tasks.serving.engines import Engine, OnnxEngine

__all__ = ["EngineModule", "load_onnx_module"]


class EngineModule(nn.Module):
    """An :class:`~tasks.serving.engines.Engine` as an ``nn.Module``: ``forward`` takes the
    preprocessed batch, runs the engine and returns logits ``B×1×S×S`` (the logit of its
    probabilities), so the engine is scored exactly like a PyTorch model."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, _ = self.engine.predict(x.detach().cpu().float().numpy())
        return torch.logit(torch.from_numpy(np.clip(probs, 1e-7, 1 - 1e-7)))[:, None]


def load_onnx_module(model_url: str, storage_options: dict | None) -> tuple[nn.Module, dict[str, Any]]:
    """An ``.onnx`` file at ``model_url`` as an :class:`EngineModule` (ONNX Runtime) in eval mode,
    with the metadata :func:`tasks.model.io.load_model` gives for a ``model.pt`` (read from the
    file's own metadata)."""
    with tempfile.TemporaryDirectory(prefix="bgremoval-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(model_url, storage_options))
        meta = read_onnx_metadata(path)
        module = EngineModule(OnnxEngine(path))  # the session holds the model in memory; the file may go
    return module.eval(), {"model": meta["model"] or None, "model_widths": None, "input_size": meta["input_size"],
                           "resize": meta["resize"], "model_url": model_url, "config_source": "onnx metadata"}
