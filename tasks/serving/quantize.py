"""int8 models for the CPU: static quantisation calibrated on the user's photos, with the layers
that cannot take it left in float.

ONNX Runtime's static quantisation (QDQ; uint8 activations with one scale per tensor, int8
weights with one scale per output channel) roughly halves U2-NetP's model time on a CPU without
VNNI (``benchmarks/int8_probe.py``). Applied to the whole published network it breaks the masks:
a few tensors carry one channel far larger than the others — in U2-NetP a near-constant channel
at 226 that the next convolution cancels with a bias of 1361 — and one uint8 scale per tensor
then leaves the small channels a handful of levels, while the cancelled error comes through
six-fold. :func:`float_islands` finds those tensors on the calibration photos (one channel's
largest value above ``dominance`` times the median channel's) and keeps them in float: the node
that makes each one and the convolutions that read it. Everything else is quantised, and the
outputs (sigmoids) stay float so that the file is read as before
(:func:`tasks.model.export.read_onnx_metadata`).

:func:`quantize_model` writes the int8 file; :func:`mask_agreement` says how far its masks move
from the float model's on photos it was not calibrated on.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_DOMINANCE",
    "QuantizationReport",
    "float_islands",
    "mask_agreement",
    "quantize_model",
]

#: A tensor whose largest channel exceeds this many times the median channel stays in float.
DEFAULT_DOMINANCE = 6.0
#: The opset per-channel QDQ needs (rembg's files are opset 11).
QDQ_OPSET = 13


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did: the file written, the photos it was calibrated on, the
    nodes left in float and why (``tensor: largest / median channel``), and the seconds taken."""

    output_path: str
    calibration_images: int
    float_nodes: list[str] = field(default_factory=list)
    dominated_tensors: dict[str, float] = field(default_factory=dict)
    quantised_nodes: int = 0
    seconds: float = 0.0


def _session(model_bytes_or_path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])


def _prepared(src: str, work: str) -> tuple[str, onnx.ModelProto, list]:
    """``src`` at opset 13 with shapes inferred and every node named, as ONNX Runtime's quantiser
    wants it: returns its path, the model and ``src``'s metadata (input size, normalisation)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(src)
    metadata = list(model.metadata_props)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QDQ_OPSET)
    if opset < QDQ_OPSET:
        model = version_converter.convert_version(model, QDQ_OPSET)
    converted = os.path.join(work, "opset.onnx")
    onnx.save(model, converted)
    prepared = os.path.join(work, "prepared.onnx")
    quant_pre_process(converted, prepared, skip_symbolic_shape=True)
    model = onnx.load(prepared)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    onnx.save(model, prepared)
    return prepared, model, metadata


def float_islands(model: str | onnx.ModelProto, inputs: Sequence[np.ndarray],
                  dominance: float = DEFAULT_DOMINANCE) -> tuple[list[str], dict[str, float]]:
    """The nodes to keep in float: for every 4-D tensor whose largest channel (max ``|value|``
    over ``inputs``) exceeds ``dominance`` times the median channel's, the node that makes it
    (with the convolution before it when that node is a ReLU) and the convolutions that read it.
    ``model``: a path or a loaded model (left unchanged).

    Returns ``(node names in graph order, {tensor: largest / median channel})``.
    """
    import onnx
    from onnx import helper

    if isinstance(model, onnx.ModelProto):
        model = onnx.ModelProto.FromString(model.SerializeToString())  # every tensor becomes an output below
    else:
        model = onnx.load(model)
    graph = model.graph
    known = {o.name for o in graph.output}
    for node in graph.node:
        for out in node.output:
            if out not in known:
                graph.output.append(helper.make_empty_tensor_value_info(out))
                known.add(out)
    session = _session(model.SerializeToString())
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, np.ndarray] = {}
    for x in inputs:
        for name, value in zip(names, session.run(names, {input_name: x}), strict=True):
            if value.ndim != 4 or value.shape[1] < 2:
                continue
            peak = np.abs(value).max(axis=(0, 2, 3))
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    dominated = {}
    for name, peak in peaks.items():
        median = float(np.median(peak))
        if median > 0 and float(peak.max()) > dominance * median:
            dominated[name] = round(float(peak.max()) / median, 1)
    producer = {out: node for node in graph.node for out in node.output}
    keep = set()
    for node in graph.node:
        if any(out in dominated for out in node.output):
            keep.add(node.name)
            before = producer.get(node.input[0]) if node.op_type == "Relu" else None
            if before is not None and before.op_type == "Conv":
                keep.add(before.name)  # the quantiser fuses Conv+Relu: the Relu alone in float leaves the Conv's output quantised
        if node.op_type == "Conv" and node.input and node.input[0] in dominated:
            keep.add(node.name)
    return [n.name for n in graph.node if n.name in keep], dominated


def quantize_model(src: str, dst: str, calibration: Sequence[np.ndarray],
                   dominance: float = DEFAULT_DOMINANCE) -> QuantizationReport:
    """Write an int8 (QDQ) copy of the ONNX model ``src`` to ``dst``, calibrated on
    ``calibration`` (network inputs, each ``1×3×S×S`` float32, as the engine prepares them).

    Nodes are named first where the file has none. :func:`float_islands` nodes and the output
    sigmoids stay float; the file's metadata (input size, normalisation) is carried over.
    Raises ``ValueError`` without calibration inputs.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ValueError("quantisation needs calibration photos; none were given")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bgremoval-quantize-") as work:
        prepared, model, metadata = _prepared(src, work)
        keep, dominated = float_islands(model, calibration, dominance)
        sigmoids = [n.name for n in model.graph.node if n.op_type == "Sigmoid"]
        input_name = model.graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._batches = iter([{input_name: np.ascontiguousarray(x, dtype=np.float32)} for x in calibration])

            def get_next(self):
                return next(self._batches, None)

        quantize_static(prepared, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep + sigmoids)
    quantised = onnx.load(dst)
    del quantised.metadata_props[:]
    quantised.metadata_props.extend(metadata)
    onnx.save(quantised, dst)
    n_quantised = sum(n.op_type == "QuantizeLinear" for n in quantised.graph.node)
    return QuantizationReport(output_path=dst, calibration_images=len(calibration), float_nodes=keep,
                              dominated_tensors=dominated, quantised_nodes=n_quantised,
                              seconds=round(time.perf_counter() - started, 1))


def mask_agreement(reference, candidate, images_rgb: Sequence[np.ndarray], threshold: float = 0.5) -> list[float]:
    """IoU between two engines' masks (probability ≥ ``threshold``) on each photo: how far a
    quantised model moves the cut-outs. An empty union counts as full agreement."""
    from tasks.serving.engines import probability_map

    scores = []
    for image in images_rgb:
        a = probability_map(reference, image) >= threshold
        b = probability_map(candidate, image) >= threshold
        union = np.logical_or(a, b).sum()
        scores.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
    return scores
