"""Cutting out with no trained model: the published U2-NetP file as it is, and as the default.

rembg's ``u2netp.onnx`` takes exactly one image (fixed batch 1) and returns seven sigmoid maps;
the engine reads that from the file. Skips without the file, except under ``CI=true``.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from tasks.cli.main import main
from tasks.model.export import read_onnx_metadata
from tasks.serving.engines import OnnxEngine, audit_engine, audit_predictor, default_model, load_engine, probability_map
from tasks.serving.pipeline import InferenceConfig, remove_backgrounds
from tasks.registry import choose_start
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item

pytestmark = pytest.mark.process  # trains, exports or registers real models: tens of seconds


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    items = [render_item(i, SynthConfig(n=5, seed=11, max_side=360)) for i in range(5)]
    for item in items:
        (folder / f"{item.stem}.jpg").write_bytes(encode_jpeg(item.image))
    return folder, items


def test_metadata_is_read_from_a_foreign_file(published):
    meta = read_onnx_metadata(str(published))
    assert meta["input_size"] == 320 and meta["batch"] == 1 and meta["probabilities"] is True
    assert meta["sides"] and len(meta["side_outputs"]) == 6
    assert meta["resize"] == "stretch" and meta["mean"] == [0.485, 0.456, 0.406]


def test_a_batch_of_four_runs_through_a_batch_one_file(published, photos):
    engine = OnnxEngine(str(published), threads=2)
    batch = np.random.default_rng(0).standard_normal((4, 3, 320, 320)).astype(np.float32)
    fused, sides = engine.predict(batch)
    assert fused.shape == (4, 320, 320) and sides.shape == (4, 6, 320, 320)
    one, _ = engine.predict(batch[2:3])
    assert np.allclose(one[0], fused[2], atol=1e-6)
    folder, items = photos
    results = remove_backgrounds([str(folder / f"{it.stem}.jpg") for it in items], engine,
                                 InferenceConfig(batch_size=4, keep_probability=True))
    assert all(r.ok for r in results), [r.error for r in results]
    for result, item in zip(sorted(results, key=lambda r: r.stem), sorted(items, key=lambda i: i.stem)):
        truth, pred = item.mask > 127, result.probability > 0.5
        assert (truth & pred).sum() / (truth | pred).sum() > 0.8
        assert result.quality is not None and 0 <= result.score <= 1


def test_remove_with_no_model_uses_the_published_weights(published, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no embedded stack's env file here
    monkeypatch.setattr("tasks.dev.stack_env.read_env_file", lambda *a, **k: {})
    folder, items = photos
    out = tmp_path / "out"
    assert main(["remove", str(folder), "-o", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "published U2-NetP weights" in said and "no MLflow registry is configured" in said
    assert len(list(out.rglob("*.png"))) == len(items)
    # rembg's own file, from rembg's folder, as it is (the batch size is read from the file)
    rembg_home = tmp_path / "u2net"
    rembg_home.mkdir()
    shutil.copy(published, rembg_home / "u2netp.onnx")
    out2 = tmp_path / "out2"
    assert main(["remove", str(folder), "-o", str(out2), "--model", str(rembg_home / "u2netp.onnx"),
                 "--batch-size", "4", "--quiet"]) == 0
    cutout = Image.open(io.BytesIO(next(out2.rglob("*.png")).read_bytes()))
    assert cutout.mode == "RGBA"


def test_default_model_prefers_the_champion(published, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/empty.db")
    source, why = default_model("no-such-model")  # a store that does not exist is read as none, not created
    assert source == str(published) and f"the MLflow store {tmp_path}/empty.db does not exist" in why
    assert not (tmp_path / "empty.db").exists()
    (tmp_path / "empty.db").touch()
    source, why = default_model("no-such-model")
    assert source == str(published) and "no champion" in why
    monkeypatch.setattr("tasks.registry.alias_version", lambda name, alias, tracking_uri=None: "3")
    source, why = default_model("catalogue")
    assert source == "models:/catalogue@champion" and "version 3" in why
    assert load_engine("pretrained").source.startswith("pretrained")


def test_init_from_keywords(published, monkeypatch):
    monkeypatch.setattr("tasks.registry.alias_version", lambda name, alias, tracking_uri=None: None)
    on_disk = {"u2netp": published}  # U2-Net's published file (165 MB) is not on this machine
    monkeypatch.setattr("tasks.model.published.find_pretrained_onnx", lambda path=None, model="u2netp": on_disk.get(model))
    assert choose_start("auto", "u2netp") == "pretrained"
    assert choose_start("auto", "u2net") is None
    on_disk["u2net"] = published.with_name("u2net.onnx")  # once fetched, U2-Net starts from its own
    assert choose_start("auto", "U2-Net") == "pretrained"
    assert choose_start("pretrained", "u2net") == "pretrained"
    assert choose_start("scratch", "u2netp") is None and choose_start("", "u2netp") is None
    assert choose_start("s3://b/model.pt", "u2net") == "s3://b/model.pt"
    with pytest.raises(ValueError, match="u2netp, u2net only"):
        choose_start("pretrained", "deeplab")
    monkeypatch.setattr("tasks.registry._champion_mismatch", lambda name, key: None)
    assert choose_start("auto", "u2netp") == "champion"


def test_the_audit_model_and_its_probability_map(published, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/empty.db")
    assert audit_engine("none")[0] is None and audit_engine("")[0] is None
    engine, why = audit_engine("auto", "no-such-model")
    assert engine is not None and "published" in why
    item = render_item(1, SynthConfig(n=2, seed=5, max_side=300))
    probability = probability_map(engine, item.image)
    assert probability.shape == item.mask.shape and probability.dtype == np.float32
    assert 0.0 <= probability.min() and probability.max() <= 1.0
    truth, predicted = item.mask > 127, probability > 0.5
    assert (truth & predicted).sum() / (truth | predicted).sum() > 0.8  # it finds the product
    predict, why_too = audit_predictor("auto", "no-such-model")
    assert why_too == why and np.array_equal(predict(item.image), probability)
    assert audit_predictor("none") == (None, "no model check (audit_model=none)")
    for variable in ("HOME", "U2NET_HOME", "BGREMOVAL_PRETRAINED_DIR"):  # a machine without the file
        monkeypatch.setenv(variable, str(tmp_path / "nothing"))
    assert audit_engine("auto", "no-such-model")[0] is None  # nothing to check with: structural checks only
