"""ONNX export: the file runs in ONNX Runtime, agrees with PyTorch and carries its preprocessing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tasks.evaluation.scoring import preprocess
from tasks.model.export import ONNX_INPUT, ONNX_OUTPUT, ONNX_SIDES, export_onnx, read_onnx_metadata
from tasks.model.u2net import build_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("u2netp").eval()
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, export_onnx(model, path, 64, resize="stretch", model_name="u2netp")


def test_export_matches_pytorch_for_any_batch(exported):
    model, info = exported
    assert info["max_abs_diff"] < 1e-3 and info["input_size"] == 64 and info["bytes"] > 1_000_000
    session = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    images = [np.random.default_rng(i).integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8) for i in range(3)]
    batch = np.stack([preprocess(im, 64) for im in images])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: batch})[0]
    with torch.inference_mode():
        want = torch.sigmoid(model(torch.from_numpy(batch)).fused).numpy()
    assert got.shape == (3, 1, 64, 64)
    assert np.abs(got - want).max() < 1e-3
    assert 0.0 <= got.min() and got.max() <= 1.0


def test_export_leaves_the_callers_model_alone(exported):
    model, _ = exported
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_metadata_names_the_preprocessing(exported):
    _, info = exported
    meta = read_onnx_metadata(info["path"])
    assert meta == {"input_size": 64, "resize": "stretch", "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225], "model": "u2netp", "output": ONNX_OUTPUT, "sides": True, "side_outputs": ["sides"],
                    "batch": None, "probabilities": True}


def test_side_outputs_follow_the_mask_output(exported):
    model, info = exported
    assert info["outputs"] == [ONNX_OUTPUT, ONNX_SIDES]
    session = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [ONNX_OUTPUT, ONNX_SIDES]
    x = np.stack([preprocess(np.full((64, 64, 3), 200, np.uint8), 64)] * 2)
    mask, sides = session.run(None, {ONNX_INPUT: x})  # rembg reads output 0 this way
    with torch.inference_mode():
        out = model(torch.from_numpy(x))
    assert sides.shape == (2, 6, 64, 64)
    for k in range(6):
        assert np.abs(sides[:, k] - torch.sigmoid(out.sides[k][:, 0]).numpy()).max() < 1e-3
    assert np.abs(mask[:, 0] - torch.sigmoid(out.fused[:, 0]).numpy()).max() < 1e-3


def test_export_without_sides_has_one_output(tmp_path):
    torch.manual_seed(1)
    info = export_onnx(build_model("u2netp").eval(), str(tmp_path / "m.onnx"), 64, sides=False, check=True)
    assert info["outputs"] == [ONNX_OUTPUT] and info["max_abs_diff"] < 1e-3
    assert read_onnx_metadata(info["path"])["sides"] is False


@pytest.mark.process
def test_both_exporters_agree(tmp_path):
    torch.manual_seed(1)
    model = build_model("u2netp").eval()
    traced = export_onnx(model, str(tmp_path / "t.onnx"), 64)
    dynamo = export_onnx(model, str(tmp_path / "d.onnx"), 64, exporter="dynamo")
    assert (traced["exporter"], traced["opset"]) == ("torchscript", 17)
    assert (dynamo["exporter"], dynamo["opset"]) == ("dynamo", 18)
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    a = ort.InferenceSession(traced["path"]).run(None, {ONNX_INPUT: x})
    b = ort.InferenceSession(dynamo["path"]).run(None, {ONNX_INPUT: x})
    assert all(np.abs(p - q).max() < 2e-3 for p, q in zip(a, b))
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, str(tmp_path / "x.onnx"), 64, exporter="tflite")
