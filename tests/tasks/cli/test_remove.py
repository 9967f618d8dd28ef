"""``bgremoval remove``: files, folders and S3 prefixes in, cut-outs (+ JPEG, masks) out."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.core import storage
from tasks.cli.main import main
from tasks.model.export import export_onnx
from tasks.model.u2net import U2Net
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.train.config import TrainConfig

TINY = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny untrained U2-Net as training writes it, plus its ONNX export."""
    folder = tmp_path_factory.mktemp("model")
    config = TrainConfig(dataset_url="unused", output_url=str(folder), model="u2netp", model_widths=TINY,
                         input_size=64)
    torch.manual_seed(0)
    model = U2Net(config.model_config()).eval()
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    export_onnx(model, str(folder / "model.onnx"), 64, model_name="u2netp")
    return str(folder)


def _products(n: int) -> list[tuple[str, bytes, tuple[int, int]]]:
    items = [render_item(i, SynthConfig(n=n, seed=4, max_side=160)) for i in range(n)]
    return [(it.stem, encode_jpeg(it.image), (it.image.shape[1], it.image.shape[0])) for it in items]


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_remove_files_and_folders(model_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    products = _products(3)
    for stem, data, _ in products[:2]:
        (folder / f"{stem}.jpg").write_bytes(data)
    (folder / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    single = tmp_path / "single.jpg"
    single.write_bytes(products[2][1])
    out = tmp_path / "out"
    status = main(["remove", str(folder), str(single), "-o", str(out), "--model", model_dir, "--mask",
                   "--background", "#336699", "--quiet"])
    captured = capsys.readouterr()
    assert status == 1  # one image failed; the others were done
    assert "corrupt.jpg" in captured.err and "3 of 4 images done, 1 failed" in captured.out
    sizes = {stem: size for stem, _, size in products}
    for stem in [p[0] for p in products[:2]] + ["single"]:
        size = sizes.get(stem, products[2][2])
        cut, jpg = _open((out / f"{stem}.png").read_bytes()), _open((out / f"{stem}.jpg").read_bytes())
        mask = _open((out / "masks" / f"{stem}.png").read_bytes())
        assert (cut.mode, cut.size) == ("RGBA", size) and (jpg.mode, jpg.size) == ("RGB", size)
        assert (mask.mode, mask.size) == ("L", size)
    assert not (out / "sub" / "corrupt.png").exists()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and sum(line["error"] is not None for line in lines) == 1
    assert all(0 <= line["score"] <= 1 for line in lines if line["error"] is None)


def test_remove_with_test_time_flip(model_dir, tmp_path, capsys):
    stem, data, size = _products(1)[0]
    (tmp_path / f"{stem}.jpg").write_bytes(data)
    out = tmp_path / "out"
    assert main(["remove", str(tmp_path / f"{stem}.jpg"), "-o", str(out), "--model", model_dir, "--flip",
                 "--quiet"]) == 0
    assert "test-time flip" in capsys.readouterr().out
    assert _open((out / f"{stem}.png").read_bytes()).size == size


def test_remove_s3_prefix_with_canvas(model_dir, s3_bucket, capsys):
    bucket, options = s3_bucket
    products = _products(3)
    for stem, data, _ in products:
        storage.write_bytes(f"{bucket}/incoming/b1/{stem}.jpg", data, options)
    originals = {o.url: o.etag for o in storage.list_objects(f"{bucket}/incoming", options)}
    status = main(["remove", f"{bucket}/incoming/b1", "-o", f"{bucket}/published", "--model", model_dir,
                   "--canvas", "200x300", "--margin", "0.05", "--quiet"])
    assert status == 0, capsys.readouterr()
    for stem, _, _ in products:
        cut = _open(storage.read_bytes(f"{bucket}/published/{stem}.png", options))
        jpg = _open(storage.read_bytes(f"{bucket}/published/{stem}.jpg", options))
        assert cut.size == jpg.size == (200, 300) and cut.mode == "RGBA" and jpg.mode == "RGB"
        assert np.asarray(cut)[..., 3].max() > 0
    assert not storage.exists(f"{bucket}/published/masks/{products[0][0]}.png", options)
    assert storage.exists(f"{bucket}/published/results.jsonl", options)
    assert {o.url: o.etag for o in storage.list_objects(f"{bucket}/incoming", options)} == originals


def test_remove_refuses_a_missing_model(tmp_path, capsys):
    assert main(["remove", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "none")]) == 2
    assert "no model" in capsys.readouterr().err
