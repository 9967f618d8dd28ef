"""``tasks.serving.quantize`` and ``bgremoval quantize``: an int8 copy that loads and runs like the
original, with the tensors that one channel dominates left in float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tasks.cli.main import main
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.model.export import export_onnx, read_onnx_metadata
from tasks.model.preprocess import prepare_input
from tasks.model.u2net import U2Net
from tasks.serving.engines import load_engine
from tasks.serving.quantize import float_islands, mask_agreement, quantize_model
from tasks.train.config import TrainConfig

pytestmark = pytest.mark.process

TINY = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}
SIZE = 64


def _photos(n: int) -> list[np.ndarray]:
    return [render_item(i, SynthConfig(n=n, seed=9, max_side=128)).image for i in range(n)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> str:
    """A tiny U2-NetP whose first convolution makes one channel ~500 on every photo."""
    folder = tmp_path_factory.mktemp("quantize")
    config = TrainConfig(dataset_url="unused", output_url=str(folder), model="u2netp", model_widths=TINY,
                         input_size=SIZE)
    torch.manual_seed(0)
    model = U2Net(config.model_config()).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        first.weight[0].zero_()
        first.bias[0] = 500.0
    path = str(folder / "model.onnx")
    export_onnx(model, path, SIZE, model_name="u2netp")
    return path


def test_the_dominated_tensor_stays_float_and_the_copy_runs_like_the_original(planted, tmp_path):
    inputs = [prepare_input(p, SIZE)[None] for p in _photos(6)]
    keep, dominated = float_islands(planted, inputs)
    first_conv = next(n.name for n in onnx.load(planted).graph.node if n.op_type == "Conv")
    assert first_conv in keep and max(dominated.values()) > 50
    report = quantize_model(planted, str(tmp_path / "int8.onnx"), inputs)
    assert first_conv in report.float_nodes and report.quantised_nodes > 10
    assert read_onnx_metadata(report.output_path)["input_size"] == SIZE  # the metadata came along
    original, int8 = load_engine(planted), load_engine(report.output_path)
    assert (int8.input_size, int8.resize, int8.mean) == (original.input_size, original.resize, original.mean)
    batch = np.concatenate(inputs[:3])
    (p32, s32), (p8, s8) = original.predict(batch), int8.predict(batch)
    assert p8.shape == p32.shape and s8.shape == s32.shape
    assert 0 <= p8.min() and p8.max() <= 1  # still probabilities: the sigmoids stayed float
    assert np.abs(p8 - p32).mean() < 0.05
    assert len(mask_agreement(original, int8, _photos(2))) == 2


def test_quantize_refuses_without_calibration(planted, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(planted, str(tmp_path / "x.onnx"), [])


def test_cli_quantize_writes_a_file_remove_takes(planted, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(_photos(8)):
        (photos / f"p{i}.jpg").write_bytes(encode_jpeg(image))
    out = tmp_path / "model.int8.onnx"
    assert main(["quantize", "--model", planted, "--calibrate", str(photos), "-o", str(out), "--n", "5",
                 "--check", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "calibrating on 5 photos" in text and "masks on 3 other photos" in text
    assert main(["remove", str(photos / "p0.jpg"), "-o", str(tmp_path / "cut"), "--model", str(out), "--quiet"]) == 0
    assert (tmp_path / "cut" / "p0.png").exists()
    assert json.loads((tmp_path / "cut" / "results.jsonl").read_text().splitlines()[0])["error"] is None
    assert main(["quantize", "--model", planted, "--calibrate", str(photos / "p0.jpg"), "-o", str(out)]) == 2
