"""How to feed an ONNX model file and read its outputs, read from the file itself (no torch).

Files this project exports (:mod:`tasks.model.export`) carry their preprocessing as metadata and a
``sides`` output; files exported elsewhere (rembg's) are read from their graph.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.model.preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ONNX_INPUT", "ONNX_OUTPUT", "ONNX_SIDES", "read_onnx_metadata"]

ONNX_INPUT = "input"
ONNX_OUTPUT = "mask"
ONNX_SIDES = "sides"





def read_onnx_metadata(onnx_path: str) -> dict[str, Any]:
    """Read how to feed an ONNX model file and read its outputs, from the file itself.

    Returns ``{"input_size": int, "resize": str, "mean": [3 floats], "std": [3 floats], "model": str,
    "output": name, "sides": bool, "side_outputs": [names], "batch": int | None, "probabilities": bool}``
    (``output``: the name of output 0, the fused prediction).

    Files this project exports carry their preprocessing as metadata and a ``sides`` output
    (B×6×S×S). Files exported elsewhere — rembg's ``u2netp.onnx``/``u2net.onnx``, any U2-Net-family
    file rembg accepts — have none: their fixed input size is read from the graph, the
    normalisation is rembg's (ImageNet mean/std, ``resize="stretch"``), and when the file has
    seven same-shaped outputs (fused first, then the six sides, as U2-Net returns them) the last
    six are its side outputs. ``batch`` is the fixed batch size of the input (1 in rembg's files),
    or None when the batch axis is dynamic; ``probabilities`` says whether output 0 comes out of a
    Sigmoid (otherwise it holds logits). Raises ``ValueError`` when the input size is neither in
    the metadata nor fixed in the graph.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    shape = session.get_inputs()[0].shape
    size = props.get("input_size") or (shape[-1] if isinstance(shape[-1], int) else None)
    if size is None:
        raise ValueError(f"{onnx_path} has no input_size metadata and a dynamic input width {shape}")
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    if ONNX_SIDES in names:
        side_outputs = [ONNX_SIDES]
    elif len(outputs) == 7 and all(o.shape == outputs[0].shape for o in outputs):
        side_outputs = names[1:]
    else:
        side_outputs = []
    return {
        "input_size": int(size),
        "resize": props.get("resize", "stretch"),
        "mean": json.loads(props["mean"]) if "mean" in props else list(IMAGENET_MEAN),
        "std": json.loads(props["std"]) if "std" in props else list(IMAGENET_STD),
        "model": props.get("model", ""),
        "output": names[0],
        "sides": bool(side_outputs),
        "side_outputs": side_outputs,
        "batch": shape[0] if isinstance(shape[0], int) else None,
        "probabilities": _ends_in_sigmoid(onnx_path, names[0]),
    }


def _ends_in_sigmoid(onnx_path: str, output_name: str) -> bool:
    """True when the graph's node that produces ``output_name`` is a Sigmoid (the output is a
    probability already); False for logits."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    return any(node.op_type == "Sigmoid" and output_name in node.output for node in graph.node)
