"""``bgremoval remove``: files, folders and S3 prefixes in, cut-outs (+ JPEG, masks) out."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.core import storage
from tasks.cli.main import main
from tasks.model.export import export_onnx
from tasks.model.refine_choice import choose_refinement, save_refine_choice
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


def test_an_earlier_runs_output_folder_among_the_photos_is_not_cut_out_again(model_dir, tmp_path, capsys):
    """`remove photos/ -o photos/out/` (as the README suggests), then `remove photos/ -o elsewhere/`:
    the cut-outs in photos/out (it holds results.jsonl) are not photos, and the run says so."""
    folder = tmp_path / "photos"
    folder.mkdir()
    products = _products(2)
    for stem, data, _ in products:
        (folder / f"{stem}.jpg").write_bytes(data)
    assert main(["remove", str(folder), "-o", str(folder / "out"), "--model", model_dir, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["remove", str(folder), "-o", str(tmp_path / "again"), "--model", model_dir, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"left out: {folder / 'out'} (an earlier run's output" in captured.err
    assert "2 of 2 images done" in captured.out and "0 inputs skipped" in captured.out
    assert sorted(p.name for p in (tmp_path / "again").glob("*.png")) == sorted(f"{s}.png" for s, _, _ in products)


def test_remove_with_test_time_flip(model_dir, tmp_path, capsys):
    stem, data, size = _products(1)[0]
    (tmp_path / f"{stem}.jpg").write_bytes(data)
    out = tmp_path / "out"
    assert main(["remove", str(tmp_path / f"{stem}.jpg"), "-o", str(out), "--model", model_dir, "--flip",
                 "--quiet"]) == 0
    assert "test-time flip" in capsys.readouterr().out
    assert _open((out / f"{stem}.png").read_bytes()).size == size


def test_remove_refines_edges_unless_told_not_to(model_dir, tmp_path):
    stem, data, size = _products(1)[0]
    (tmp_path / f"{stem}.jpg").write_bytes(data)
    masks = {}
    for name, flags in (("refined", []), ("raw", ["--no-refine"])):
        out = tmp_path / name
        assert main(["remove", str(tmp_path / f"{stem}.jpg"), "-o", str(out), "--model", model_dir, "--only-mask",
                     "--quiet", *flags]) == 0
        masks[name] = np.asarray(_open((out / f"{stem}.png").read_bytes()))
    assert masks["refined"].shape == masks["raw"].shape == size[::-1]
    assert not np.array_equal(masks["refined"], masks["raw"])


def test_remove_follows_the_refinement_measured_for_the_model_unless_told(model_dir, tmp_path, capsys):
    """A model whose calibration found refinement not paying (``refinement.json``) is published plain
    by default (``--refine auto``); ``--refine on`` still refines; a model without a choice is refined."""
    stem, data, _ = _products(1)[0]
    (tmp_path / f"{stem}.jpg").write_bytes(data)
    measured = tmp_path / "measured"
    shutil.copytree(model_dir, measured)
    save_refine_choice(choose_refinement([0.99], [0.98], "val"), str(measured))

    def mask(model: str, *flags: str) -> tuple[np.ndarray, str]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert main(["remove", str(tmp_path / f"{stem}.jpg"), "-o", str(out), "--model", model, "--only-mask",
                     "--quiet", *flags]) == 0
        said = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("edge refinement:"))
        return np.asarray(_open((out / f"{stem}.png").read_bytes())), said

    followed, said = mask(str(measured))
    assert said == "edge refinement: off (measured for this model on 1 val pairs: mean IoU refined 98.000 % vs plain 99.000 %)"
    plain, said_off = mask(model_dir, "--refine", "off")
    refined, said_default = mask(model_dir)
    forced, said_on = mask(str(measured), "--refine", "on")
    assert np.array_equal(followed, plain) and np.array_equal(forced, refined) and not np.array_equal(plain, refined)
    assert (said_off, said_on) == ("edge refinement: off (asked for)", "edge refinement: on (asked for)")
    assert said_default.startswith("edge refinement: on (the model has no measured choice")


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


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_model_folder_on_s3_brings_its_refinement_choice(model_dir, s3_bucket, tmp_path, capsys, backend):
    """ONNX Runtime reads a local copy of the file, PyTorch the object itself: either way the files
    beside the model come along, so ``auto`` follows the model's own choice."""
    bucket, options = s3_bucket
    folder = f"{bucket}/training/v1/run-s3-{backend}"
    for name in ("model.onnx", "model.pt", "config.json"):
        storage.write_bytes(f"{folder}/{name}", (Path(model_dir) / name).read_bytes(), options)
    stem, data, _ = _products(1)[0]
    (tmp_path / f"{stem}.jpg").write_bytes(data)
    run = ["remove", str(tmp_path / f"{stem}.jpg"), "-o", str(tmp_path / "out"), "--model", folder, "--quiet",
           "--backend", backend]
    assert main(run) == 0
    assert "edge refinement: on (the model has no measured choice" in capsys.readouterr().out
    save_refine_choice(choose_refinement([0.99], [0.98], "val"), folder, options)
    assert main(run) == 0
    assert "edge refinement: off (measured for this model on 1 val pairs" in capsys.readouterr().out


def test_remove_of_inputs_that_do_not_exist_says_so_without_loading_a_model(tmp_path, capsys):
    assert main(["remove", str(tmp_path / "nope.jpg"), "-o", str(tmp_path / "out"), "--model", "no-such-model"]) == 1
    captured = capsys.readouterr()
    assert f"{tmp_path / 'nope.jpg'}: no such file or folder" in captured.err and "model" not in captured.err
    assert not (tmp_path / "out").exists()


def test_remove_refuses_a_missing_model(tmp_path, capsys):
    assert main(["remove", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "none")]) == 2
    assert "no model" in capsys.readouterr().err


def test_remove_names_the_published_models_and_how_to_fetch_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BGREMOVAL_PRETRAINED_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["remove", str(tmp_path), "-o", str(tmp_path / "out"), "--model", "pretrained:deeplab"]) == 2
    assert "there are: u2netp, u2net" in capsys.readouterr().err
    assert main(["remove", str(tmp_path), "-o", str(tmp_path / "out"), "--model", "pretrained:u2net"]) == 2
    assert "bgremoval pretrained fetch --model u2net" in capsys.readouterr().err


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def test_remove_stdin_to_stdout_writes_one_png(model_dir, monkeypatch, capsysbinary):
    stem, data, size = _products(1)[0]
    monkeypatch.setattr("sys.stdin", _Stdin(data))
    assert main(["remove", "-", "-o", "-", "--model", model_dir]) == 0
    captured = capsysbinary.readouterr()
    cut = _open(captured.out)
    assert (cut.mode, cut.size) == ("RGBA", size)
    assert b"model:" in captured.err  # messages go to stderr, never into the image


def test_remove_only_mask_to_stdout_and_to_a_folder(model_dir, tmp_path, monkeypatch, capsysbinary):
    products = _products(2)
    monkeypatch.setattr("sys.stdin", _Stdin(products[0][1]))
    assert main(["remove", "-", "-o", "-", "--only-mask", "--model", model_dir]) == 0
    mask = _open(capsysbinary.readouterr().out)
    assert (mask.mode, mask.size) == ("L", products[0][2])
    folder = tmp_path / "in"
    folder.mkdir()
    for stem, data, _ in products:
        (folder / f"{stem}.jpg").write_bytes(data)
    out = tmp_path / "out"
    assert main(["remove", str(folder), "-o", str(out), "--only-mask", "--model", model_dir, "--quiet"]) == 0
    for stem, _, size in products:
        mask = _open((out / f"{stem}.png").read_bytes())
        assert (mask.mode, mask.size) == ("L", size)
        assert not (out / f"{stem}.jpg").exists() and not (out / "masks").exists()


def test_remove_one_file_to_stdout_equals_the_folder_run(model_dir, tmp_path, capsysbinary):
    stem, data, _ = _products(1)[0]
    photo = tmp_path / f"{stem}.jpg"
    photo.write_bytes(data)
    assert main(["remove", str(photo), "-o", "-", "--model", model_dir]) == 0
    streamed = np.asarray(_open(capsysbinary.readouterr().out))
    assert main(["remove", str(photo), "-o", str(tmp_path / "out"), "--model", model_dir, "--quiet"]) == 0
    assert np.array_equal(streamed, np.asarray(_open((tmp_path / "out" / f"{stem}.png").read_bytes())))


def test_remove_one_photo_into_a_named_file_as_rembg_does(model_dir, tmp_path, capsys, monkeypatch):
    stem, data, size = _products(1)[0]
    photo = tmp_path / f"{stem}.jpg"
    photo.write_bytes(data)
    assert main(["remove", str(photo), "-o", str(tmp_path / "out"), "--model", model_dir, "--quiet", "--mask"]) == 0
    folder_run = tmp_path / "out"
    for name, kind in (("cut.png", f"{stem}.png"), ("deep/on-white.jpg", f"{stem}.jpg")):
        assert main(["remove", str(photo), "-o", str(tmp_path / name), "--model", model_dir]) == 0
        assert (tmp_path / name).read_bytes() == (folder_run / kind).read_bytes()
    assert main(["remove", str(photo), "-o", str(tmp_path / "mask.png"), "--model", model_dir, "--only-mask"]) == 0
    assert (tmp_path / "mask.png").read_bytes() == (folder_run / "masks" / f"{stem}.png").read_bytes()
    assert main(["remove", str(photo), "-o", str(photo), "--model", model_dir]) == 2
    assert main(["remove", str(photo), "-o", str(tmp_path / "m.jpg"), "--model", model_dir, "--only-mask"]) == 2
    assert main(["remove", str(photo), "-o", str(tmp_path / "m.png"), "--model", model_dir, "--mask"]) == 2
    assert main(["remove", str(photo), "-o", str(tmp_path / "m.webp"), "--model", model_dir]) == 2  # not a folder
    assert photo.read_bytes() == data and not (tmp_path / "m.jpg").exists() and not (tmp_path / "m.png").exists()
    assert not (tmp_path / "m.webp").exists()
    err = capsys.readouterr().err
    assert "refusing to overwrite the input" in err and "a mask is written as a PNG" in err and "give a folder" in err
    assert "cannot write" in err and "m.webp" in err
    # from stdin too; a name that ends in a slash is a folder
    monkeypatch.setattr("sys.stdin", _Stdin(data))
    assert main(["remove", "-", "-o", str(tmp_path / "from-stdin.png"), "--model", model_dir]) == 0
    assert (tmp_path / "from-stdin.png").read_bytes() == (folder_run / f"{stem}.png").read_bytes()
    assert main(["remove", str(photo), "-o", str(tmp_path / "a-folder.png") + "/", "--model", model_dir, "--quiet"]) == 0
    assert (tmp_path / "a-folder.png" / f"{stem}.png").read_bytes() == (folder_run / f"{stem}.png").read_bytes()


def test_remove_refuses_an_output_it_cannot_use_before_loading_the_model(model_dir, tmp_path, capsys, monkeypatch):
    stem, data, _ = _products(1)[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"{stem}.jpg").write_bytes(data)
    (tmp_path / "a-file").write_bytes(b"x")
    for out in (tmp_path / "in", tmp_path / "a-file"):
        assert main(["remove", str(tmp_path / "in"), "-o", str(out), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "is an input folder" in err and "is a file" in err and "no-model" not in err
    # a mistyped input is a failed run, said before any model loads; an empty folder says it has no photo
    assert main(["remove", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--model", model_dir, "--quiet"]) == 1
    assert f"{tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["remove", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--model", model_dir, "--quiet"]) == 1
    assert f"no photos found in {tmp_path / 'empty'}" in capsys.readouterr().err
    # a registered model needs a registry: said up front, no mlflow.db appears in the working folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BGREMOVAL_STATE", str(tmp_path / "no-stack"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["remove", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--model", "models:/m@champion"]) == 2
    assert "no MLflow registry is configured" in capsys.readouterr().err and not (tmp_path / "mlflow.db").exists()


def test_remove_stdin_errors_are_clear(model_dir, tmp_path, monkeypatch, capsysbinary):
    monkeypatch.setattr("sys.stdin", _Stdin(b"not an image"))
    assert main(["remove", "-", "-o", "-", "--model", model_dir]) == 1
    captured = capsysbinary.readouterr()
    assert captured.out == b"" and b"bgremoval remove: -:" in captured.err
    assert main(["remove", "-", str(tmp_path), "-o", "-", "--model", model_dir]) == 2
    assert b"exactly one input" in capsysbinary.readouterr().err
