"""Tests for ``tasks.serving.engines`` and ``tasks.serving.pipeline``: model sources, preprocessing equal to evaluation's, EXIF
orientation, output geometry from a "perfect" engine, bad inputs, ONNX vs PyTorch agreement."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from PIL import Image, ImageOps

from tasks import registry
from tasks.dev import stack
from tasks.evaluation.scoring import preprocess
from tasks.model.export import export_onnx
from tasks.model.preprocess import IMAGENET_STD
from tasks.serving.engines import ONNX_RUNTIMES, Engine, FlipAveragedEngine, load_engine, openvino_installed
from tasks.serving.mlflow_model import pyfunc_model
from tasks.serving.pipeline import (
    CutoutResult,
    InferenceConfig,
    check_output_location,
    cut_out_bytes,
    decode_image,
    iter_remove_backgrounds,
    list_images,
    parse_background,
    parse_canvas,
    prepare_input,
    remove_backgrounds,
    remove_to,
    single_output_config,
    write_outputs,
)
from tasks.model.u2net import U2Net
from tasks.train.config import TrainConfig

TINY = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}
SIZE = 64


def write_model_dir(folder, onnx: bool = True, pt: bool = True) -> str:
    """A tiny U2-Net in the training output layout: model.pt, config.json and model.onnx."""
    config = TrainConfig(dataset_url="unused", output_url=str(folder), model="u2netp", model_widths=TINY,
                         input_size=SIZE)
    torch.manual_seed(0)
    model = U2Net(config.model_config()).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if pt:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, folder / "model.pt")
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
    if onnx:
        export_onnx(model, str(folder / "model.onnx"), SIZE, model_name="u2netp")
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_model_dir(tmp_path_factory.mktemp("models") / "run")


class SquareEngine(Engine):
    """A "perfect" stand-in: probability 1 inside ``[lo:hi, lo:hi]`` of the S×S map, 0 outside
    (and sides that agree), whatever the image."""

    backend, input_size, resize, source = "fake", SIZE, "stretch", "fake:square"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, lo: int = 16, hi: int = 48) -> None:
        self.lo, self.hi, self.batches = lo, hi, []

    def predict(self, batch):
        self.batches.append(batch.shape[0])
        p = np.zeros((batch.shape[0], SIZE, SIZE), np.float32)
        p[:, self.lo:self.hi, self.lo:self.hi] = 1.0
        return p, np.repeat(p[:, None], 6, axis=1)


def _jpeg(image_rgb: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_rgb).save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def _photo(h: int = 120, w: int = 90, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 0)


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# ----------------------------------------------------------------------------------------------

def test_options_parse_and_validate():
    assert parse_background("#00ff7F") == (0, 255, 127) and parse_background((1, 2, 3)) == (1, 2, 3)
    assert parse_canvas("1000x1333") == (1000, 1333) and parse_canvas(None) is None
    assert InferenceConfig(canvas="30x40").canvas == (30, 40)
    for bad in ({"background": "white"}, {"canvas": "10by20"}, {"margin": 0.5}, {"batch_size": 0},
                {"cutout": False, "composite": False, "mask": False}):
        with pytest.raises(ValueError):
            InferenceConfig(**bad)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("shape", [(200, 150), (40, 50)])  # shrinking (area) and enlarging (bilinear)
def test_prepare_input_equals_evaluation_preprocessing(resize, shape):
    image = _photo(*shape)
    fast, reference = prepare_input(image, SIZE, resize), preprocess(image, SIZE, resize)
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    # a shrunk photo is averaged in 16-bit integers: within 1/512 of a level of the float resize
    np.testing.assert_allclose(fast, reference, atol=1 / (512 * 255 * min(IMAGENET_STD)) + 2e-5)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_applies_exif_orientation_like_pillow(orientation):
    image = _photo(30, 50, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", exif=exif)
    want = np.asarray(ImageOps.exif_transpose(_open(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(decode_image(buf.getvalue()), want)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_photo_with_transparency_is_laid_on_white_not_on_its_hidden_colours(mode):
    rgba = np.zeros((40, 30, 4), np.uint8)  # hidden black everywhere, one opaque red square, a half-transparent band
    rgba[10:30, 5:25] = (220, 20, 20, 255)
    rgba[0:5, :] = (0, 0, 0, 128)
    image = Image.fromarray(rgba, "RGBA")
    image = image.convert(mode) if mode != "P" else image.convert("RGB").convert("P")
    if mode == "P":
        image.info["transparency"] = 0  # palette index 0 (black) is transparent
    buf = io.BytesIO()
    image.save(buf, "PNG")
    decoded = decode_image(buf.getvalue())
    assert decoded.shape == (40, 30, 3) and (decoded[35:, :] == 255).all()  # the transparent part is white
    assert decoded[20, 15].tolist() == np.asarray(image.convert("RGB"))[20, 15].tolist()  # opaque: its own colour
    if mode != "P":
        assert 120 <= decoded[2, 2, 0] <= 135  # half-transparent black over white


def test_decode_reports_bad_data():
    for data, reason in [(b"", "empty"), (b"not an image at all", "not an image"),
                         (_jpeg(_photo())[:40], "decode")]:
        with pytest.raises(ValueError, match=reason):
            decode_image(data)


def test_outputs_have_the_right_sizes_modes_and_pixels(tmp_path):
    image = np.full((120, 90, 3), (200, 30, 40), np.uint8)
    rotated = np.ascontiguousarray(np.rot90(image, 1))  # stored 90×120; EXIF 6 turns it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "upright.jpg").write_bytes(_jpeg(image))
    (tmp_path / "turned.jpg").write_bytes(_jpeg(rotated, exif=exif))
    engine = SquareEngine()
    results = remove_backgrounds([str(tmp_path / "upright.jpg"), str(tmp_path / "turned.jpg")], engine,
                                 InferenceConfig(mask=True, background="#ff8000", batch_size=2))
    assert engine.batches == [2]
    for r in results:
        assert r.ok and (r.width, r.height) == (90, 120) and r.score == pytest.approx(1.0)
        cut, jpg, mask = _open(r.cutout_png), _open(r.composite_jpeg), _open(r.mask_png)
        assert (cut.mode, cut.size) == ("RGBA", (90, 120))
        assert (jpg.mode, jpg.size) == ("RGB", (90, 120))
        assert (mask.mode, mask.size) == ("L", (90, 120))
        alpha = np.asarray(cut)[..., 3]
        # the 64-px square [16:48] is the middle half of the photo
        assert alpha[60, 45] == 255 and alpha[5, 5] == 0 and alpha[115, 85] == 0
        assert np.array_equal(alpha, np.asarray(mask))
        assert np.asarray(cut)[5, 5].tolist() == [0, 0, 0, 0]  # transparent pixels carry no colour
        pixels = np.asarray(jpg).astype(int)
        assert np.abs(pixels[5, 5] - [255, 128, 0]).max() <= 8   # the background colour, channels in order
        assert np.abs(pixels[60, 45] - [200, 30, 40]).max() <= 8  # the product
        assert np.abs(np.asarray(cut)[60, 45, :3].astype(int) - [200, 30, 40]).max() <= 8


def test_test_time_flip_averages_the_mirrored_prediction(tmp_path):
    # the stand-in always answers "columns 0-15 are product" (certain) and the rest background:
    # the mirrored pass answers columns 48-63, and averaging leaves both bands at 0.5
    left_band = SquareEngine(0, SIZE)
    left_band.predict = lambda batch: (_band(batch.shape[0]), np.repeat(_band(batch.shape[0])[:, None], 6, axis=1))
    flipped = FlipAveragedEngine(left_band)
    batch = np.zeros((2, 3, SIZE, SIZE), np.float32)
    probs, sides = flipped.predict(batch)
    assert probs.shape == (2, SIZE, SIZE) and sides.shape == (2, 6, SIZE, SIZE)
    np.testing.assert_allclose(probs[:, :, :16], 0.5, atol=1e-5)
    np.testing.assert_allclose(probs[:, :, 48:], 0.5, atol=1e-5)
    assert probs[:, :, 16:48].max() < 1e-5 and np.allclose(sides[:, 3], probs)
    assert flipped.describe().endswith("test-time flip") and flipped.input_size == SIZE
    # a mirror-symmetric answer is unchanged, end to end
    (tmp_path / "a.jpg").write_bytes(_jpeg(np.full((64, 64, 3), 128, np.uint8)))
    plain, = remove_backgrounds([str(tmp_path / "a.jpg")], SquareEngine(), InferenceConfig(mask=True))
    both, = remove_backgrounds([str(tmp_path / "a.jpg")], FlipAveragedEngine(SquareEngine()), InferenceConfig(mask=True))
    assert both.ok and np.array_equal(np.asarray(_open(both.mask_png)), np.asarray(_open(plain.mask_png)))


def _band(n: int) -> np.ndarray:
    p = np.zeros((n, SIZE, SIZE), np.float32)
    p[:, :, :16] = 1.0
    return p


def test_the_published_outline_is_pulled_onto_the_photos_edges(tmp_path):
    """The engine's square lands on photo rows/cols [64:192]; the photo's own bright square is
    [60:196]. Refined (the default), the published mask moves towards the photo's edges; with
    ``refine=None`` it is the engine's square as resized; the quality score is the same."""
    photo = np.full((256, 256, 3), 40, np.uint8)
    photo[60:196, 60:196] = 220
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", photo)[1].tobytes())
    refined, = remove_backgrounds([str(tmp_path / "a.png")], SquareEngine(), InferenceConfig(mask=True))
    plain, = remove_backgrounds([str(tmp_path / "a.png")], SquareEngine(), InferenceConfig(mask=True, refine=None))

    def extent(result) -> tuple[int, int]:
        cols = np.nonzero(np.asarray(_open(result.mask_png))[128] >= 128)[0]
        return int(cols.min()), int(cols.max()) + 1

    assert extent(plain) == pytest.approx((64, 192), abs=1)
    lo, hi = extent(refined)
    assert 60 <= lo < 63 and 193 < hi <= 196, (lo, hi)
    assert refined.score == plain.score
    assert single_output_config("mask").refine is not None and single_output_config("mask", refine=None).refine is None


def test_canvas_crops_and_centres_the_product(tmp_path):
    image = _photo(200, 100)
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", image)[1].tobytes())
    # product = rows/cols [16:32] of the 64-px map → a 25×50 px box in the 100×200 photo
    result, = remove_backgrounds([str(tmp_path / "a.png")], SquareEngine(16, 32),
                                 InferenceConfig(canvas=(300, 300), margin=0.1, mask=True, refine=None))
    cut, jpg, mask = _open(result.cutout_png), _open(result.composite_jpeg), _open(result.mask_png)
    assert cut.size == jpg.size == (300, 300) and cut.mode == "RGBA" and jpg.mode == "RGB"
    assert mask.size == (100, 200)  # the mask stays aligned with the photo
    ys, xs = np.nonzero(np.asarray(cut)[..., 3] >= 128)
    # the box fills the 240-px usable height (10 % margin), aspect 1:2 kept, centred
    assert ys.min() == pytest.approx(30, abs=2) and ys.max() + 1 == pytest.approx(270, abs=2)
    assert xs.min() == pytest.approx(90, abs=2) and xs.max() + 1 == pytest.approx(210, abs=2)


def test_bad_inputs_are_reported_and_skipped_and_inputs_untouched(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg(_photo()))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = hashlib.sha256(good.read_bytes()).hexdigest()
    urls = [str(tmp_path / n) for n in ("empty.jpg", "good.jpg", "missing.jpg", "broken.jpg", "good.jpg")]
    results = list(iter_remove_backgrounds(urls, SquareEngine(), InferenceConfig(batch_size=2)))
    assert [r.source_url for r in results] == urls  # one result per input, in order
    assert [r.ok for r in results] == [False, True, False, False, True]
    assert "empty" in results[0].error and "cannot read" in results[2].error and results[3].error
    assert results[0].cutout_png is None and results[0].summary()["score"] is None
    assert hashlib.sha256(good.read_bytes()).hexdigest() == before


#: An S3 endpoint nobody listens on, tried once (the store is down, not the photo bad).
UNREACHABLE_S3 = {"key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
                  "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{stack.free_port()}", "region_name": "us-east-1"}}


def test_an_unreachable_store_fails_the_run_instead_of_failing_the_photos(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg(_photo()))
    urls = [str(good), "s3://drops/d1/p1.jpg"]
    with pytest.raises(Exception) as raised:
        list(iter_remove_backgrounds(urls, SquareEngine(), InferenceConfig(batch_size=1), UNREACHABLE_S3))
    assert "Could not connect to the endpoint URL" in str(raised.value)


def test_write_outputs_layout_and_refuses_to_overwrite_inputs(tmp_path):
    src = tmp_path / "in" / "shirt.png"
    src.parent.mkdir()
    src.write_bytes(cv2.imencode(".png", _photo())[1].tobytes())
    result, = remove_backgrounds([str(src)], SquareEngine(), InferenceConfig(mask=True))
    written = write_outputs(result, str(tmp_path / "out"))
    assert written == {"cutout_png": str(tmp_path / "out" / "shirt.png"),
                       "composite_jpeg": str(tmp_path / "out" / "shirt.jpg"),
                       "mask_png": str(tmp_path / "out" / "masks" / "shirt.png")}
    with pytest.raises(ValueError, match="overwrite the input"):
        write_outputs(result, str(tmp_path / "in"))
    assert write_outputs(CutoutResult("x", "y", error="bad"), str(tmp_path / "out")) == {}


def test_no_output_is_written_over_another_input_and_the_output_folder_is_not_an_input(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    webp, png = cv2.imencode(".webp", _photo(seed=1))[1].tobytes(), cv2.imencode(".png", _photo(seed=2))[1].tobytes()
    (folder / "shirt.webp").write_bytes(webp)
    (folder / "shirt.png").write_bytes(png)  # another photo, named as shirt.webp's cut-out: it loses the name clash
    # written beside the photos, shirt.webp's cut-out would replace shirt.png: the run refuses it and writes nothing
    summary = remove_to([str(folder / "shirt.webp"), str(folder / "shirt.png")], str(folder), SquareEngine(),
                        InferenceConfig(), progress=False, log=lambda line: None)
    assert (summary["ok"], summary["failed"], len(summary["problems"])) == (0, 1, 1)
    assert (folder / "shirt.png").read_bytes() == png and not (folder / "shirt.jpg").exists()
    # every output is checked before the first is written: a later one hitting a photo stops them all
    result, = remove_backgrounds([str(folder / "shirt.webp")], SquareEngine(), InferenceConfig())
    with pytest.raises(ValueError, match="overwrite the input"):
        write_outputs(result, str(tmp_path / "elsewhere"), protected={str(tmp_path / "elsewhere" / "shirt.jpg")})
    assert not (tmp_path / "elsewhere").exists()
    # an output folder inside the input folder is left out of the inputs, on every run
    for _ in range(2):
        again = remove_to([str(folder)], str(folder / "out"), SquareEngine(), InferenceConfig(), progress=False,
                          log=lambda line: None)
        assert (again["images"], again["ok"]) == (1, 1)
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["results.jsonl", "shirt.jpg", "shirt.png"]
    # the input folder itself, the folder holding an input photo, or the same folder through a link: refused
    (tmp_path / "link").symlink_to(folder)
    for inputs, out in (([folder], folder), ([folder / "shirt.webp"], folder), ([folder], tmp_path / "link")):
        with pytest.raises(ValueError, match="is an input folder|holds the input"):
            check_output_location([str(i) for i in inputs], str(out))
    assert sorted(p.name for p in folder.iterdir()) == ["out", "results.jsonl", "shirt.png", "shirt.webp"]


def test_an_output_folder_around_the_input_folder_leaves_the_photos_in(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(_jpeg(_photo()))
    check_output_location([str(tmp_path / "photos")], str(tmp_path))
    summary = remove_to([str(tmp_path / "photos")], str(tmp_path), SquareEngine(), InferenceConfig(), progress=False)
    assert (summary["images"], summary["ok"]) == (1, 1) and (tmp_path / "a.png").exists()


def test_an_output_location_that_cannot_work_is_refused_before_any_photo_is_read(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_location([str(tmp_path)], str(tmp_path / "a.jpg"))
    with pytest.raises(ValueError, match="cannot reach the output location s3://out/x"):
        check_output_location([str(tmp_path)], "s3://out/x", UNREACHABLE_S3)
    check_output_location([str(tmp_path)], str(tmp_path / "new" / "folder"))  # created when written


def test_remove_to_counts_empty_and_below_threshold_cut_outs_and_keeps_its_log_when_interrupted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"p{i}.jpg").write_bytes(_jpeg(_photo(seed=i)))
    summary = remove_to([str(folder)], str(tmp_path / "out"), SquareEngine(lo=0, hi=0), InferenceConfig(),
                        progress=False, threshold=0.5)
    assert (summary["ok"], summary["empty"], summary["below_threshold"], summary["threshold"]) == (4, 4, 4, 0.5)
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(line["below_threshold"] for line in lines)
    assert {line["model"] for line in lines} == {"fake:square"}  # which model made each file

    class Interrupting(SquareEngine):
        def predict(self, batch):
            if len(self.batches) == 2:  # the third photo's batch
                raise KeyboardInterrupt
            return super().predict(batch)

    stopped = remove_to([str(folder)], str(tmp_path / "cut"), Interrupting(), InferenceConfig(batch_size=1),
                        progress=False)
    lines = (tmp_path / "cut" / "results.jsonl").read_text().splitlines()
    stems = [json.loads(line)["stem"] for line in lines]  # the photos finished before the interruption
    assert stopped["interrupted"] and stems and stems == ["p0", "p1"][:len(stems)] and stopped["ok"] == len(stems)


def test_list_images_expands_folders_and_reports_clashes(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.PNG", "notes.txt", "sub/c.webp"):
        (tmp_path / "d" / name).write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    items, problems = list_images([str(tmp_path / "d"), str(tmp_path / "a.jpg"), str(tmp_path / "nope")])
    assert [stem for _, stem in items] == ["a", "b", "sub/c"]
    assert any("taken by" in p for p in problems) and any("no such" in p for p in problems)


# ----------------------------------------------------------------------------------------------
# Real engines
# ----------------------------------------------------------------------------------------------

def test_load_engine_picks_the_backend_from_the_source(model_dir, tmp_path):
    onnx = load_engine(model_dir, backend="onnx")
    assert onnx.backend == "onnx" and onnx.input_size == SIZE and onnx.resize == "stretch"
    cpu_runtime = "openvino" if openvino_installed() else "onnx"
    assert load_engine(model_dir).backend == cpu_runtime
    assert load_engine(f"{model_dir}/model.onnx").backend == cpu_runtime
    assert load_engine(model_dir, backend="torch").backend == "torch"
    only_pt = write_model_dir(tmp_path / "pt_only", onnx=False)
    assert load_engine(only_pt).backend == "torch"
    assert load_engine(f"{only_pt}/model.pt").backend == "torch"
    with pytest.raises(FileNotFoundError):
        load_engine(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_engine(f"{model_dir}/model.onnx", backend="torch")
    with pytest.raises(ValueError, match="CPU"):
        load_engine(model_dir, device="cuda", backend="onnx")


@pytest.mark.process
def test_registry_uris_are_downloaded_first(model_dir, private_mlflow, tmp_path):
    with private_mlflow(tmp_path, "engines") as run_id:
        version = registry.register_model(model_dir, "engines-m", run_id=run_id, pyfunc_model=pyfunc_model())["version"]
        registry.promote("engines-m", version)
        engine = load_engine("models:/engines-m@champion")
    # the alias is read once and the version it names is loaded and recorded (results.jsonl's "model")
    assert engine.backend in ONNX_RUNTIMES and engine.source == f"models:/engines-m@champion (version {version})"
    assert engine.input_size == SIZE


def test_onnx_and_pytorch_engines_agree(model_dir, tmp_path):
    urls = []
    for i, (h, w) in enumerate([(130, 100), (80, 120), (100, 100)]):
        path = tmp_path / f"p{i}.jpg"
        path.write_bytes(_jpeg(_photo(h, w, seed=i)))
        urls.append(str(path))
    config = InferenceConfig(keep_probability=True, batch_size=2)
    by_onnx = remove_backgrounds(urls, load_engine(model_dir, backend="onnx"), config)
    by_torch = remove_backgrounds(urls, load_engine(model_dir, backend="torch"), config)
    for a, b in zip(by_onnx, by_torch, strict=True):
        assert a.ok and b.ok and a.probability.shape == (a.height, a.width)
        assert np.abs(a.probability - b.probability).max() < 1e-3
        assert a.quality.side_agreement is not None
        assert a.score == pytest.approx(b.score, abs=1e-2)


def test_cut_out_bytes_equals_the_batched_pipeline_and_reports_bad_bytes(tmp_path):
    data = _jpeg(_photo())
    (tmp_path / "a.jpg").write_bytes(data)
    config = InferenceConfig(mask=True, canvas=(120, 160))
    batched, = remove_backgrounds([str(tmp_path / "a.jpg")], SquareEngine(), config)
    single = cut_out_bytes(data, SquareEngine(), config, stem="a")
    assert single.ok and single.stem == "a" and single.source_url == "-"
    for key in ("cutout_png", "composite_jpeg", "mask_png"):
        assert getattr(single, key) == getattr(batched, key)
    assert single.score == batched.score
    bad = cut_out_bytes(b"\x89PNG broken", SquareEngine(), config)
    assert not bad.ok and bad.error and bad.cutout_png is None and not bad.too_large


def test_a_photo_over_the_pixel_cap_is_marked_too_large_not_just_described(tmp_path):
    from tasks.dev.badinputs import png_header_only

    capped = InferenceConfig(max_pixels=10_000)
    over = cut_out_bytes(_jpeg(_photo()), SquareEngine(), capped)
    assert not over.ok and over.too_large and "megapixels" in over.error
    bomb = cut_out_bytes(png_header_only(20_000, 20_000), SquareEngine(), InferenceConfig())  # Pillow's own limit
    assert not bomb.ok and bomb.too_large


def test_only_the_requested_outputs_are_encoded(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg(_photo()))
    only_mask, = remove_backgrounds([str(tmp_path / "a.jpg")], SquareEngine(),
                                    InferenceConfig(mask=True, cutout=False, composite=False))
    assert only_mask.mask_png is not None and only_mask.cutout_png is None and only_mask.composite_jpeg is None
    no_jpeg, = remove_backgrounds([str(tmp_path / "a.jpg")], SquareEngine(), InferenceConfig(composite=False))
    assert no_jpeg.cutout_png is not None and no_jpeg.composite_jpeg is None and no_jpeg.mask_png is None


def test_decontaminate_removes_the_old_background_from_the_edge(tmp_path):
    photo = np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8)
    photo[...] = (230, 20, 20)  # shot on red
    photo[32:96, 32:96] = (20, 20, 230)  # a blue product where SquareEngine's square lands
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", photo[..., ::-1])[1].tobytes())
    rims = {}
    for decontaminate in (False, True):
        result, = remove_backgrounds([str(tmp_path / "a.png")], SquareEngine(),
                                     InferenceConfig(decontaminate=decontaminate, background="#ffffff"))
        jpeg = np.asarray(_open(result.composite_jpeg)).astype(int)
        cut = np.asarray(_open(result.cutout_png)).astype(int)
        edge = (cut[..., 3] > 0) & (cut[..., 3] < 255)
        assert edge.sum() > 50  # the bilinear resize gives the square a soft edge
        # red over green is the old background: in the cut-out's colours and in the JPEG on white
        rims[decontaminate] = ((cut[edge][:, 0] - cut[edge][:, 1]).max(), (jpeg[edge][:, 0] - jpeg[edge][:, 1]).max())
        assert np.abs(cut[32 + 4:96 - 4, 32 + 4:96 - 4, :3] - (20, 20, 230)).max() <= 2  # the product itself is kept
    assert rims[False][0] > 150 and rims[True][0] <= 2  # the cut-out's edge colours: red before, blue after
    assert rims[False][1] >= 10 and rims[True][1] <= 3  # the JPEG (chroma subsampling blurs the rim)


def _fixed_batch_copy(src: str, dst: str) -> str:
    """``src`` with its batch axis fixed at 1, as rembg's files have it."""
    model = onnx.load(src)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, dst)
    return dst


@pytest.mark.parametrize("backend", ONNX_RUNTIMES)
def test_several_sessions_give_the_same_maps_as_one(model_dir, tmp_path, backend):
    if backend == "openvino" and not openvino_installed():
        pytest.skip("OpenVINO is not installed (test_openvino_engine.py fails under CI=true)")
    batch = np.stack([prepare_input(_photo(seed=i), SIZE) for i in range(5)])
    for path in (f"{model_dir}/model.onnx", _fixed_batch_copy(f"{model_dir}/model.onnx", str(tmp_path / "b1.onnx"))):
        one = load_engine(path, threads=2, backend=backend)
        two = load_engine(path, threads=2, sessions=2, backend=backend)
        assert two.n_sessions == 2 and two.backend == backend
        (p1, s1), (p2, s2) = one.predict(batch), two.predict(batch)
        assert p1.shape == p2.shape == (5, SIZE, SIZE) and s1.shape == s2.shape
        assert np.allclose(p1, p2, atol=1e-5) and np.allclose(s1, s2, atol=1e-5)
    with pytest.raises(ValueError, match="sessions"):
        load_engine(f"{model_dir}/model.onnx", sessions=0)


def test_a_downloaded_models_folder_is_removed_when_the_process_ends(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = ("from tasks.serving.engines import _process_temp_dir\n"
              "folder = _process_temp_dir('bgremoval-model-')\n"
              "open(folder + '/model.onnx', 'wb').write(b'x' * 1000)\n"
              "print(folder)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[3])
    folder = Path(done.stdout.strip())
    assert done.returncode == 0 and folder.name.startswith("bgremoval-model-") and not folder.exists()


def test_only_remove_leaves_out_an_earlier_runs_output_folder(tmp_path):
    """A subfolder holding results.jsonl is an earlier `remove` output: `remove` and its watch leave it
    out (and name it); the production DAG's listing of a drop takes every photo whatever lies beside it."""
    from tasks.serving.pipeline import list_inputs

    (tmp_path / "out" / "nested").mkdir(parents=True)
    for name in ("a.jpg", "out/a.jpg", "out/nested/b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "out" / "results.jsonl").write_text("{}\n")
    (tmp_path / "results.jsonl").write_text("{}\n")  # the input folder itself is listed whatever it holds
    remove = list_inputs([str(tmp_path)], skip_earlier_outputs=True)
    assert [stem for _, stem in remove.items] == ["a"] and remove.earlier_outputs == (f"{tmp_path}/out",)
    everything = list_inputs([str(tmp_path)])
    assert [stem for _, stem in everything.items] == ["a", "out/a", "out/nested/b"] and everything.earlier_outputs == ()


def test_photos_someone_put_in_the_output_folder_are_never_replaced(tmp_path):
    """`remove R -o R/edits` where R/edits/ holds a retoucher's sku1.jpg (no results.jsonl: not a run's
    output): R/sku1.jpg's composite would replace it, so that photo fails, named, and the file stays."""
    (tmp_path / "R" / "edits").mkdir(parents=True)
    (tmp_path / "R" / "sku1.jpg").write_bytes(_jpeg(_photo(seed=1)))
    (tmp_path / "R" / "sku2.jpg").write_bytes(_jpeg(_photo(seed=2)))
    retouched = _jpeg(_photo(seed=3))
    (tmp_path / "R" / "edits" / "sku1.jpg").write_bytes(retouched)
    failures = []
    summary = remove_to([str(tmp_path / "R")], str(tmp_path / "R" / "edits"), SquareEngine(), InferenceConfig(),
                        progress=False, log=failures.append)
    assert (summary["ok"], summary["failed"]) == (1, 1) and "overwrite the input" in failures[0]
    assert (tmp_path / "R" / "edits" / "sku1.jpg").read_bytes() == retouched
    assert (tmp_path / "R" / "edits" / "sku2.png").exists()
    # a run again replaces the files runs wrote (results.jsonl names them), never the retoucher's
    sku2 = (tmp_path / "R" / "edits" / "sku2.png").stat().st_mtime_ns
    for _ in range(2):
        again = remove_to([str(tmp_path / "R")], str(tmp_path / "R" / "edits"), SquareEngine(), InferenceConfig(),
                          progress=False, log=failures.append)
        assert (again["ok"], again["failed"]) == (1, 1)
    assert (tmp_path / "R" / "edits" / "sku1.jpg").read_bytes() == retouched
    assert (tmp_path / "R" / "edits" / "sku2.png").stat().st_mtime_ns != sku2
    lines = [json.loads(line) for line in (tmp_path / "R" / "edits" / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(line["source_url"]).name for line in lines) == ["sku1.jpg", "sku2.jpg"]  # one line a photo


def test_two_photos_whose_outputs_would_land_on_the_same_file_are_not_both_cut_out(tmp_path):
    """x.jpg's mask and masks/x.jpg's cut-out are both out/masks/x.png with --mask: the second is left
    out and named, instead of one silently replacing the other."""
    (tmp_path / "Q" / "masks").mkdir(parents=True)
    (tmp_path / "Q" / "x.jpg").write_bytes(_jpeg(_photo(seed=1)))
    (tmp_path / "Q" / "masks" / "x.jpg").write_bytes(_jpeg(_photo(seed=2)))
    summary = remove_to([str(tmp_path / "Q")], str(tmp_path / "out"), SquareEngine(), InferenceConfig(mask=True),
                        progress=False, log=lambda line: None)
    assert (summary["images"], summary["ok"]) == (1, 1)
    assert summary["problems"] == [f"{tmp_path}/Q/x.jpg: left out, its output {tmp_path}/out/masks/x.png would "
                                   f"replace one of {tmp_path}/Q/masks/x.jpg's"]
    assert _open((tmp_path / "out" / "masks" / "x.png").read_bytes()).mode == "RGBA"  # masks/x.jpg's cut-out


def test_photos_in_formats_remove_cannot_read_are_named_not_passed_over(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(_jpeg(_photo()))
    (tmp_path / "d" / "IMG_0001.HEIC").write_bytes(b"ftypheic")
    items, problems = list_images([str(tmp_path / "d")])
    assert [stem for _, stem in items] == ["x"]
    assert problems == [f"{tmp_path}/d/IMG_0001.HEIC: left out, .HEIC photos are not read (convert it to JPEG, PNG "
                        "or WebP)"]


def test_the_output_folder_is_marked_as_a_runs_output_before_the_first_photo(tmp_path):
    """A run killed half-way leaves a folder a later run on the parent leaves out, not cut-outs to cut out."""
    (tmp_path / "P").mkdir()
    for i in range(3):
        (tmp_path / "P" / f"p{i}.jpg").write_bytes(_jpeg(_photo(seed=i)))
    marked = []

    class Watching(SquareEngine):
        def predict(self, batch):
            marked.append((tmp_path / "P" / "run1" / "results.jsonl").exists())
            return super().predict(batch)

    remove_to([str(tmp_path / "P")], str(tmp_path / "P" / "run1"), Watching(), InferenceConfig(batch_size=1),
              progress=False)
    assert marked == [True, True, True]


def test_a_run_with_fewer_outputs_or_a_failure_keeps_the_earlier_files_replaceable(tmp_path):
    """The log keeps, per photo, every file the runs wrote: after a run with the cut-out only (or one
    that failed), a run with the mask again may replace the mask written two runs before."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.jpg").write_bytes(_jpeg(_photo()))
    out = str(tmp_path / "photos" / "out")
    for config in (InferenceConfig(mask=True), InferenceConfig(), InferenceConfig(mask=True)):
        summary = remove_to([str(tmp_path / "photos")], out, SquareEngine(), config, progress=False,
                            log=lambda line: None)
        assert (summary["ok"], summary["failed"]) == (1, 0)

    class Failing(SquareEngine):
        def predict(self, batch):
            raise RuntimeError("the model failed")

    assert remove_to([str(tmp_path / "photos")], out, Failing(), InferenceConfig(), progress=False,
                     log=lambda line: None)["failed"] == 1
    again = remove_to([str(tmp_path / "photos")], out, SquareEngine(), InferenceConfig(mask=True), progress=False,
                      log=lambda line: None)
    assert (again["ok"], again["failed"]) == (1, 0)
    [line] = (tmp_path / "photos" / "out" / "results.jsonl").read_text().splitlines()
    assert set(json.loads(line)["outputs"]) == {"cutout_png", "composite_jpeg", "mask_png"}
