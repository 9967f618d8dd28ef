"""The registered model as an MLflow pyfunc: encoded photos in, cut-out bytes out, nothing pickled.

:func:`tasks.registry.register_model` logs it as *models from code*: MLflow runs
:data:`MODEL_CODE` (which names :class:`CutoutModel`) instead of unpickling an object, the ONNX
file is an artifact, and the project's ``tasks`` package travels in the model's ``code`` folder.
So ``mlflow models serve -m models:/bgremoval-u2net@champion`` needs ONNX Runtime, NumPy, OpenCV
and Pillow, not this project's installation nor torch. A request::

    POST /invocations
    {"dataframe_records": [{"image": "<base64 of a JPEG or PNG>"}],
     "params": {"output": "mask", "background": "#f4f4f4", "decontaminate": false, "refine": "auto"}}

Input: a binary column ``image`` (JSON clients send base64). Params: ``output`` (``cutout``: the
RGBA PNG, ``mask``, ``jpeg``: the product on ``background``), ``decontaminate``, ``refine`` (the edge
refinement of ``bgremoval remove --refine``: ``auto`` follows the choice measured for this model when
it was calibrated, ``on``/``off`` force it). One row comes back per
image: ``output`` (the bytes; base64 in JSON), ``media_type``, ``quality`` (the production quality
score) and ``error`` (empty when the image worked; a photo that cannot be cut out gets its reason
and no bytes, and the other rows are kept).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, requires
from typing import Any

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd

from tasks.core.codecs import encode_jpeg
from tasks.serving.engines import load_engine, refinement_for
from tasks.serving.pipeline import SINGLE_OUTPUTS, cut_out_bytes, single_output_config

__all__ = ["DEFAULT_PARAMS", "INPUT_COLUMN", "MODEL_ARTIFACT", "MODEL_CODE", "OUTPUT_COLUMNS", "CutoutModel",
           "pyfunc_model", "signature"]

#: The file MLflow runs to build the model (:func:`mlflow.models.set_model`).
MODEL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow_model_code.py")
#: The artifact key of the ONNX file the model runs.
MODEL_ARTIFACT = "model.onnx"
INPUT_COLUMN = "image"
#: The columns of the rows :meth:`CutoutModel.predict` returns, with their MLflow types.
OUTPUT_COLUMNS: dict[str, str] = {"output": "binary", "media_type": "string", "quality": "double", "error": "string"}
#: The params a request may set, with their defaults (the model signature's param schema).
DEFAULT_PARAMS: dict[str, Any] = {"output": "cutout", "background": "#ffffff", "decontaminate": False,
                                  "refine": "auto"}


class CutoutModel(mlflow.pyfunc.PythonModel):
    """Background removal with the logged ONNX file, on ONNX Runtime (the CPU engine of
    ``bgremoval remove``)."""

    def load_context(self, context) -> None:
        """Open the ONNX artifact."""
        self.engine = load_engine(context.artifacts[MODEL_ARTIFACT], backend="onnx")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Cut out every image of ``model_input`` (a DataFrame with the column ``image``, or a
        list of bytes); see the module's docstring for params and the rows returned."""
        chosen = {**DEFAULT_PARAMS, **(params or {})}
        config = single_output_config(str(chosen["output"]), str(chosen["background"]),
                                      bool(chosen["decontaminate"]), refine=refinement_for(self.engine, chosen["refine"])[0])
        rows = []
        for i, data in enumerate(_images_of(model_input)):
            result = cut_out_bytes(bytes(data or b""), self.engine, config, stem=f"row{i}", source=f"row {i}")
            rows.append({"output": result.output(chosen["output"]) or b"", "media_type": SINGLE_OUTPUTS[chosen["output"]],
                         "quality": float("nan") if result.score is None else float(result.score),
                         "error": result.error or ""})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _images_of(model_input) -> list:
    """The encoded images of a pyfunc input: the ``image`` column of a DataFrame, or a list."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {INPUT_COLUMN!r} of encoded images, "
                             f"got {list(model_input.columns)}")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, (bytes, bytearray)):
        return [model_input]
    return list(model_input)


def signature():
    """The model's signature: a binary ``image`` column in, :data:`OUTPUT_COLUMNS` out, the
    :data:`DEFAULT_PARAMS` as params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {str: "string", bool: "boolean"}
    return ModelSignature(
        inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()]),
        params=ParamSchema([ParamSpec(name, kinds[type(value)], value) for name, value in DEFAULT_PARAMS.items()]),
    )


def _example_photo() -> bytes:
    """A small JPEG of a garment-like shape on a light background (the logged input example)."""
    image = np.full((96, 72, 3), 236, np.uint8)
    cv2.ellipse(image, (36, 50), (24, 36), 0, 0, 360, (40, 60, 150), -1)
    return encode_jpeg(image)


def _requirements() -> list[str] | None:
    """The core install's requirements (``pip install bgremoval``, no extras), read from the
    installed package; None (MLflow infers them) when the package is not installed."""
    try:
        return [r for r in requires("bgremoval") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return None


def pyfunc_model() -> dict[str, Any]:
    """The keyword arguments of ``mlflow.pyfunc.log_model`` that log :class:`CutoutModel` from
    code (``artifacts`` aside, which :func:`tasks.registry.register_model` fills, with the ONNX
    file under :data:`MODEL_ARTIFACT`)."""
    return {"python_model": MODEL_CODE,
            "code_paths": [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
            "signature": signature(),
            "input_example": (pd.DataFrame({INPUT_COLUMN: [_example_photo()]}), {"output": "mask"}),
            "pip_requirements": _requirements()}
