"""Load a model folder: ``model.pt`` (the bare state dict the training loop writes, see
:mod:`tasks.train.loop`) and ``config.json`` next to it (or the ``config`` entry of
``result.json``), which names the model, its optional ``model_widths``, the ``input_size`` and the
``resize`` mode. Training (``init_from``), scoring, the PyTorch engine and the registry load
weights through here; ONNX files are run by ONNX Runtime (:mod:`tasks.serving`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tasks.core import layout, storage
from tasks.model.config import MODEL_NAMES, RESIZE_MODES, TRAINING_SIZE, StageWidths, U2NetConfig
from tasks.model.u2net import U2Net, build_model

__all__ = [
    "load_model",
    "load_state_dict_from_url",
    "read_run_config",
    "read_train_result",
    "train_result_lines",
]


def read_train_result(model_url: str, storage_options: dict | None = None) -> dict:
    """The ``result.json`` of the training run a model reference belongs to (its folder, or the folder
    of its ``model.pt``); {} when there is none."""
    url = layout.train_result(layout.model_folder(model_url))
    if not storage.exists(url, storage_options):
        return {}
    return json.loads(storage.read_bytes(url, storage_options))


def train_result_lines(result: dict) -> list[str]:
    """What a log says of a training run's result (``result.json``'s fields): its val IoU beside its
    starting weights', and a warning when training lowered it (the gate then decides, on test)."""
    final, start = (result.get("metrics") or {}).get("val_iou"), result.get("start_val_iou")
    line = f"trained {result.get('model', 'the model')}: val IoU " + ("-" if final is None else f"{final * 100:.2f} %")
    if start is not None:
        line += f" (starting weights: {start * 100:.2f} %)"
    lines = [line + f", MLflow run {result.get('mlflow_run_id') or '-'}"]
    if final is not None and start is not None and final < start:
        lines.append(f"warning: training lowered the val IoU below its starting weights' ({final * 100:.2f} % < "
                     f"{start * 100:.2f} %); a lower learning_rate, more pairs or more epochs may help")
    return lines


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def read_run_config(folder: str, storage_options: dict | None) -> tuple[dict[str, Any], str]:
    """The training config saved next to ``model.pt``: ``config.json``, else ``result.json``'s
    ``config`` entry, else ``{}``; returns it with the name of the file it came from."""
    config_url = layout.model_config(folder)
    if storage.exists(config_url, storage_options):
        return json.loads(storage.read_bytes(config_url, storage_options)), layout.MODEL_CONFIG
    result_url = layout.train_result(folder)
    if storage.exists(result_url, storage_options):
        result = json.loads(storage.read_bytes(result_url, storage_options))
        if isinstance(result.get("config"), Mapping) and result["config"]:
            return dict(result["config"]), layout.TRAIN_RESULT
    return {}, "none"


def _widths_config(widths: Mapping[str, Sequence[Sequence[int]]]) -> U2NetConfig:
    try:
        encoder = tuple(StageWidths(int(m), int(o)) for m, o in widths["encoder"])
        decoder = tuple(StageWidths(int(m), int(o)) for m, o in widths["decoder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("model_widths must be {'encoder': [[mid, out]] * 6, 'decoder': [[mid, out]] * 5}, "
                         f"got {widths!r}") from exc
    return U2NetConfig(encoder=encoder, decoder=decoder)


def _fits(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)


def load_state_dict_from_url(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Load model weights from ``url`` (``init_from`` of training, ``model.pt`` of :func:`load_model`).

    Accepts a bare state dict (``model.pt``, the reference U2-Net ``.pth`` files), a training
    checkpoint (its ``"model"`` entry) or a dict with a ``"state_dict"`` entry; a ``module.``
    prefix left by DataParallel/DDP is removed. Returns the state dict on the CPU.
    """
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"init_from: no file at {url}")
    loaded = torch.load(io.BytesIO(storage.read_bytes(url, storage_options)), map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"init_from: {url} holds no state dict (expected tensors by parameter name)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in loaded.items()}


def load_model(model_url: str, model_name: str | None = None,
               storage_options: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained PyTorch model (``model.pt`` + its config) for inference.

    Args:
        model_url: a ``model.pt`` written by :func:`tasks.train.loop.train` (a bare state dict; a
            training checkpoint or ``{"state_dict": ...}`` file works too), the run folder
            holding it. An exported ``.onnx`` file is run by ONNX Runtime instead: see
            :func:`tasks.evaluation.scoring.load_model` (both kinds) and
            :mod:`tasks.serving.onnx_module`.
        model_name: ``"u2net"``/``"u2netp"``; overrides the name in the run's config. Channel
            widths saved in the config (``model_widths``) still take precedence, as in training.
            Without a name from either source the architecture whose parameter shapes match
            the state dict is used.
        storage_options: fsspec options for ``model_url``.

    Returns ``(model, metadata)``: the model in eval mode on the CPU, and a dict with ``model``
    (name), ``model_widths`` (or None), ``input_size`` (the config's, else 320), ``resize``
    (``"stretch"`` or ``"letterbox"``), ``model_url`` and ``config_source`` (``"config.json"``,
    ``"result.json"`` or ``"none"``). Raises ``FileNotFoundError`` when there is no model file and
    ``ValueError`` when the weights fit no architecture or the named one.
    """
    if model_url.lower().endswith(".onnx"):
        raise ValueError(f"{model_url} is an ONNX file: ONNX Runtime runs it (tasks.serving.onnx_module, or "
                         "tasks.evaluation.scoring.load_model, which takes both kinds)")
    candidate = layout.model_weights(model_url)
    if storage.exists(candidate, storage_options):  # model_url is the run folder
        model_url = candidate
    if not storage.is_file(model_url, storage_options):  # a folder without model.pt is no model either
        raise FileNotFoundError(f"no model at {model_url}: pass a model.pt written by training or its run folder")
    state = load_state_dict_from_url(model_url, storage_options)
    config, source = read_run_config(_parent(model_url), storage_options)
    widths = config.get("model_widths")
    name = model_name or config.get("model")
    if widths:
        model: nn.Module = U2Net(_widths_config(widths))
    elif name:
        model = build_model(name)
    else:
        matches = [n for n in MODEL_NAMES if _fits(build_model(n), state)]
        if not matches:
            raise ValueError(f"the weights at {model_url} fit none of {', '.join(MODEL_NAMES)} and no config.json "
                             "names the model: pass model_name")
        name = matches[0]
        model = build_model(name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the weights at {model_url} do not fit model {name!r} "
                         f"(widths {widths!r}): {str(exc).splitlines()[0]}") from exc
    model.eval()
    resize = str(config.get("resize") or "stretch")
    if resize not in RESIZE_MODES:
        raise ValueError(f"{source} at {_parent(model_url)} has resize {resize!r}; expected one of {RESIZE_MODES}")
    metadata = {
        "model": "".join(c for c in str(name).lower() if c not in "-_ ") if name else None,
        "model_widths": widths or None,
        "input_size": int(config.get("input_size") or TRAINING_SIZE),
        "resize": resize,
        "model_url": model_url,
        "config_source": source,
    }
    return model, metadata
