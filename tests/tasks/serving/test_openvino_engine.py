"""The OpenVINO engine: the same ONNX files as ONNX Runtime, the same probabilities.

OpenVINO comes with ``make install`` (the ``openvino`` extra); without it these tests skip,
except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tasks.model.export import export_onnx
from tasks.serving import engines
from tasks.serving.engines import OnnxEngine, OpenVinoEngine, load_engine

SIZE = 32


@pytest.fixture(autouse=True)
def _openvino():
    if not engines.openvino_installed():
        reason = "OpenVINO is not installed (pip install 'bgremoval[openvino]'; make install brings it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def project_onnx(write_model_folder, tmp_path_factory) -> str:
    """This project's export of an untrained tiny U2-NetP: a dynamic batch and a ``sides`` output."""
    from tasks.model.io import load_model

    folder = write_model_folder(tmp_path_factory.mktemp("ov-model"), input_size=SIZE)
    model, _ = load_model(folder)
    path = f"{folder}/model.onnx"
    export_onnx(model.eval(), path, SIZE, model_name="u2netp")
    return path


def _batch(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("sessions", [1, 2])
def test_openvino_and_onnx_runtime_give_the_same_probabilities(project_onnx, sessions):
    batch = _batch(3)
    reference = OnnxEngine(project_onnx, threads=2).predict(batch)
    engine = OpenVinoEngine(project_onnx, threads=2, sessions=sessions)
    assert engine.backend == "openvino" and engine.input_size == SIZE
    fused, sides = engine.predict(batch)
    assert fused.shape == (3, SIZE, SIZE) and sides.shape == (3, 6, SIZE, SIZE)
    assert np.abs(fused - reference[0]).max() < 1e-4
    assert np.abs(sides - reference[1]).max() < 1e-4
    again, _ = engine.predict(batch[1:2])  # a second call does not overwrite the first call's arrays
    assert np.abs(again[0] - fused[1]).max() < 1e-4 and np.abs(fused - reference[0]).max() < 1e-4


def test_concurrent_callers_each_get_their_own_answer(project_onnx):
    engine = OpenVinoEngine(project_onnx, threads=2)
    batches = [_batch(2, seed=s) for s in range(6)]
    alone = [engine.predict(b)[0] for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda b: engine.predict(b)[0], batches))
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)


def test_the_published_file_runs_as_it_is(published):
    batch = _batch(2, size=320)
    reference = OnnxEngine(str(published), threads=2).predict(batch)
    fused, sides = OpenVinoEngine(str(published), threads=2).predict(batch)  # fixed batch 1: image by image
    assert fused.shape == (2, 320, 320) and sides.shape == (2, 6, 320, 320)
    assert np.abs(fused - reference[0]).max() < 1e-4 and np.abs(sides - reference[1]).max() < 1e-4


def test_auto_prefers_openvino_and_falls_back_to_onnx_runtime(project_onnx, monkeypatch):
    assert load_engine(project_onnx).backend == "openvino"
    assert load_engine(project_onnx, backend="onnx").backend == "onnx"
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert load_engine(project_onnx).backend == "onnx"
    with pytest.raises(ValueError, match="bgremoval\\[openvino\\]"):
        load_engine(project_onnx, backend="openvino")
    with pytest.raises(ValueError, match="CPU"):
        load_engine(project_onnx, device="cuda", backend="openvino")
