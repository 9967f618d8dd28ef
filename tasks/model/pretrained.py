"""The published U2-Net weights turned into the project's model (needs torch).

The U-2-Net authors published weights for U2-NetP and the full U2-Net (Apache-2.0); rembg
distributes them as ``u2netp.onnx`` and ``u2net.onnx``: a fixed 1×3×320×320 input, seven sigmoid
outputs (fused first, then the six sides) and batch-norm folded into the RSU convolutions. Finding
and fetching the files is :mod:`tasks.model.published` (no torch: serving needs only that).

:func:`onnx_to_state_dict` turns a file into a ``U2NetP`` or ``U2Net`` state dict: the folded
convolution weights and biases in graph order, and every batch-norm set to the identity (in eval
mode). :func:`unfold_batchnorm` then gives the batch-norms the statistics of real images, so that
training mode, which normalises by batch statistics, starts where the published model is.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from tasks.core import layout, storage
from tasks.model.config import PRETRAINED, TRAINING_SIZE
from tasks.model.published import DEFAULT, md5sum, require_pretrained_onnx
from tasks.model.u2net import U2Net, build_model

__all__ = [
    "PRETRAINED",
    "has_identity_batchnorm",
    "load_pretrained_model",
    "onnx_to_state_dict",
    "unfold_batchnorm",
    "write_pretrained_folder",
]

#: The architecture ``pretrained`` means without a model name.
PRETRAINED_MODEL = DEFAULT


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

def _conv_layers(model: U2Net) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every convolution of ``model`` in execution order, with the batch-norm that follows it."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            bn = getattr(parent, "bn_s1", None) if name.endswith("conv_s1") else None
            layers.append((name, module, bn))
    return layers


def _attribute(node, name: str, default):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def onnx_to_state_dict(onnx_path: str | os.PathLike, model_name: str = PRETRAINED_MODEL) -> dict[str, torch.Tensor]:
    """Turn a U2-Net-family ONNX file with folded batch-norm into a state dict of ``model_name``.

    The file's convolutions, taken in graph order, give the weights and biases of the model's
    convolutions in execution order; each must match in shape and dilation. The batch-norms
    are set to the identity in eval mode (weight 1, bias 0, mean 0, variance ``1 - eps``).
    Returns the state dict (CPU tensors). Raises ``ValueError`` when the file's convolutions do
    not match the model's.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    model = build_model(model_name)
    layers = _conv_layers(model)
    if len(convs) != len(layers):
        raise ValueError(f"{onnx_path} has {len(convs)} convolutions; {model_name} has {len(layers)}")
    state = model.state_dict()
    for node, (name, conv, bn) in zip(convs, layers, strict=True):
        if len(node.input) < 3 or node.input[1] not in weights or node.input[2] not in weights:
            raise ValueError(f"{onnx_path}: convolution {node.name or node.output[0]} has no constant weight and bias")
        weight, bias = weights[node.input[1]], weights[node.input[2]]
        dilation = tuple(_attribute(node, "dilations", [1, 1]))
        if tuple(weight.shape) != tuple(conv.weight.shape) or dilation != tuple(conv.dilation):
            raise ValueError(f"{onnx_path}: convolution {node.name or node.output[0]} has weight {tuple(weight.shape)} "
                             f"and dilation {dilation}; {model_name}'s {name} needs {tuple(conv.weight.shape)} and "
                             f"{tuple(conv.dilation)}")
        state[f"{name}.weight"] = torch.from_numpy(np.array(weight, dtype=np.float32))
        state[f"{name}.bias"] = torch.from_numpy(np.array(bias, dtype=np.float32))
        if bn is not None:
            prefix = name.rsplit(".", 1)[0] + ".bn_s1"
            channels = bn.num_features
            state[f"{prefix}.weight"] = torch.ones(channels)
            state[f"{prefix}.bias"] = torch.zeros(channels)
            state[f"{prefix}.running_mean"] = torch.zeros(channels)
            state[f"{prefix}.running_var"] = torch.full((channels,), 1.0 - bn.eps)
    return state


def load_pretrained_model(path: str | os.PathLike | None = None, model: str = PRETRAINED_MODEL) -> U2Net:
    """The published weights of ``model`` (U2-NetP by default) as the project's
    :class:`~tasks.model.u2net.U2Net`, in eval mode on the CPU (``path``: as :func:`require_pretrained_onnx`)."""
    network = build_model(model)
    network.load_state_dict(onnx_to_state_dict(require_pretrained_onnx(path, model), model))
    return network.eval()


def write_pretrained_folder(dst_url: str, path: str | os.PathLike | None = None,
                            storage_options: dict | None = None, model: str = PRETRAINED_MODEL) -> str:
    """Write the converted published weights of ``model`` as a model folder (``model.pt`` +
    ``config.json``, the layout training writes) at ``dst_url`` (local or ``s3://``); returns the
    ``model.pt`` URL."""
    source = require_pretrained_onnx(path, model)  # ValueError for an architecture without published weights
    state = onnx_to_state_dict(source, model)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    model_url = layout.model_weights(dst_url)
    storage.write_bytes(model_url, buffer.getvalue(), storage_options)
    config = {"model": model, "input_size": TRAINING_SIZE, "resize": "stretch",
              "init_source": f"{PRETRAINED}:{source.name} md5 {md5sum(source)}"}
    storage.write_text(layout.model_config(dst_url), json.dumps(config, indent=2), storage_options)
    return model_url


# ----------------------------------------------------------------------------------------------
# Batch-norm for fine-tuning
# ----------------------------------------------------------------------------------------------

def has_identity_batchnorm(model: nn.Module) -> bool:
    """True when every batch-norm of ``model`` is the identity that :func:`onnx_to_state_dict`
    writes (and there is at least one). A freshly initialised model (variance 1, not ``1 - eps``)
    is not taken for one."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return bool(norms) and all(
        bool(torch.all(m.weight == 1)) and bool(torch.all(m.bias == 0)) and bool(torch.all(m.running_mean == 0))
        and bool(torch.allclose(m.running_var, torch.full_like(m.running_var, 1.0 - m.eps), rtol=0.0, atol=1e-7))
        for m in norms)


@torch.no_grad()
def unfold_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Give identity batch-norms the statistics of real inputs without changing what the model
    computes in eval mode.

    Each batch-norm's input mean ``m`` and variance ``v`` (per channel, over ``batches``, with
    the model in eval mode so every layer sees the published model's activations) become its
    running statistics, and its affine parameters become ``weight = sqrt(v + eps)``,
    ``bias = m``: eval mode still computes the identity, and training mode, which normalises by
    the batch's statistics, starts close to it. Returns the number of images seen. Raises
    ``ValueError`` when ``batches`` is empty.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: dict[int, list[torch.Tensor]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().float()
        entry = sums.setdefault(id(module), [torch.zeros(x.shape[1]), torch.zeros(x.shape[1]), torch.zeros(())])
        entry[0] += x.sum(dim=(0, 2, 3)).cpu()
        entry[1] += (x * x).sum(dim=(0, 2, 3)).cpu()
        entry[2] += x.shape[0] * x.shape[2] * x.shape[3]

    was_training = model.training
    model.eval()
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    seen = 0
    try:
        for batch in batches:
            model(batch)
            seen += int(batch.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("unfold_batchnorm needs at least one batch of images")
    for module in norms:
        total, squares, count = sums[id(module)]
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        module.weight.copy_(torch.sqrt(var + module.eps))
        module.bias.copy_(mean)
    return seen
