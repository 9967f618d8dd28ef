"""Tests for ``tasks.evaluation.scoring``: loading ``model.pt`` as training writes it, prediction at the
original size, exact scores from a hand-built "perfect" model, and dataset/folder evaluation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from tasks.core import storage
from tasks.evaluation.scoring import (
    evaluate_dataset,
    evaluate_folder,
    evaluate_pairs,
    load_model,
    predict_batch,
    predict_probabilities,
    preprocess,
)
from tasks.model.u2net import U2Net, U2NetOutput
from tasks.serving.engines import FlipAveragedEngine, load_engine
from tasks.serving.onnx_module import EngineModule
from tasks.dev.synth import encode_jpeg, encode_png
from tasks.train.config import TrainConfig
from tasks.train.data import SegmentationDataset, prepare_split
from tasks.dev.synthetic import write_synthetic_dataset

TINY = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}
SIZE = 64


def _write_run(folder, input_size: int = SIZE, with_config: bool = True) -> str:
    """Write ``model.pt`` (bare state dict, as the loop does) and ``config.json`` for a tiny model."""
    config = TrainConfig(dataset_url="unused", output_url=str(folder), model="u2netp", model_widths=TINY,
                         input_size=input_size)
    torch.manual_seed(0)
    model = U2Net(config.model_config())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "model.pt")
    if with_config:
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return str(folder / "model.pt")


class SquareModel(nn.Module):
    """Ignores the image: logits +20 inside ``[lo:hi, lo:hi]`` of the S×S input, -20 outside."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> U2NetOutput:
        self.seen.append(tuple(x.shape))
        out = torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), -20.0)
        out[:, :, self.lo:self.hi, self.lo:self.hi] = 20.0
        return U2NetOutput(fused=out, sides=())


def test_load_model_reads_config_and_weights(tmp_path):
    url = _write_run(tmp_path / "run")
    model, meta = load_model(url)
    assert not model.training
    assert meta["input_size"] == SIZE and meta["resize"] == "stretch" and meta["model_widths"] == TINY
    assert meta["config_source"] == "config.json" and meta["model"] == "u2netp"
    saved = torch.load(url, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # the run folder works too
    assert load_model(str(tmp_path / "run"))[1]["model_url"] == url


def test_load_model_without_config_needs_a_fitting_architecture(tmp_path):
    url = _write_run(tmp_path / "bare", with_config=False)
    with pytest.raises(ValueError, match="fit none of"):
        load_model(url)
    with pytest.raises(ValueError, match="do not fit model 'u2netp'"):
        load_model(url, model_name="u2netp")
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing" / "model.pt"))


def test_preprocess_matches_training(tmp_path):
    rows = write_synthetic_dataset(str(tmp_path / "ds"), n=2, seed=3, max_side=90)
    sample = prepare_split(str(tmp_path / "ds"), "train", cache_dir=str(tmp_path / "cache"))[0]
    expected, _ = SegmentationDataset([sample], SIZE)[0]
    image = cv2.cvtColor(cv2.imread(sample.image_path), cv2.COLOR_BGR2RGB)
    np.testing.assert_allclose(preprocess(image, SIZE), expected.numpy(), atol=1e-6)
    expected_lb, _ = SegmentationDataset([sample], SIZE, resize="letterbox")[0]
    np.testing.assert_allclose(preprocess(image, SIZE, "letterbox"), expected_lb.numpy(), atol=1e-6)
    assert rows


def test_predictions_come_back_at_the_original_size(tmp_path):
    model, meta = load_model(_write_run(tmp_path / "run"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(50, 83), (120, 40)]]
    prob = predict_probabilities(model, images[0], meta["input_size"])
    assert prob.shape == (50, 83) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    batch = predict_batch(model, images, meta["input_size"])
    assert [p.shape for p in batch] == [(50, 83), (120, 40)]
    np.testing.assert_allclose(batch[0], prob, atol=1e-5)
    assert predict_probabilities(model, images[1], SIZE, "letterbox").shape == (120, 40)
    assert predict_probabilities(model, images[0], SIZE, output_size=(166, 100)).shape == (100, 166)


def test_evaluate_pairs_perfect_and_disjoint_square():
    model = SquareModel(16, 48)  # in the 64-px input
    image = np.zeros((128, 128, 3), np.uint8)  # twice the input: the square maps to [32:96]
    square = np.zeros((128, 128), np.uint8)
    square[32:96, 32:96] = 255
    disjoint = np.zeros((128, 128), np.uint8)
    disjoint[100:120, 0:20] = 255
    # a downscaled 64-px image with its full-resolution 128-px mask: scored at the mask's size
    small = np.zeros((64, 64, 3), np.uint8)
    scores = evaluate_pairs(model, [("same", "a", image, square), ("apart", None, image, disjoint),
                                    ("big", "a", small, square)], SIZE)
    assert model.seen == [(1, 3, SIZE, SIZE)] * 3
    same, apart, full = scores
    assert same.iou == 1.0 and same.boundary_f == 1.0 and same.cluster == "a"
    assert 0 < same.mae < 0.01  # only the bilinearly upsampled edge (0.25/0.75) is soft
    assert apart.iou == 0.0 and apart.boundary_f == 0.0 and apart.cluster == "all"
    assert full.iou == 1.0 and full.stem == "big"
    with pytest.raises(ValueError, match="threshold"):
        evaluate_pairs(model, [], SIZE, threshold=1.0)


def test_an_engine_with_test_time_flip_is_scored_like_the_mean_of_both_passes(tmp_path):
    # scoring runs the same flip as `bgremoval remove --flip`: the engine's, behind EngineModule
    engine = load_engine(_write_run(tmp_path / "run"), device="cpu", backend="torch")
    model = engine.model
    with torch.no_grad():  # soft logits: engines hand over float32 probabilities, which saturate
        model.outconv.weight.mul_(0.02)
    flipped = EngineModule(FlipAveragedEngine(engine))
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(preprocess(image, SIZE))[None]
    with torch.inference_mode():
        plain, mirrored = model(x).fused, model(x.flip(-1)).fused.flip(-1)
        both = flipped(x)
    assert plain.abs().max() < 10
    torch.testing.assert_close(both, (plain + mirrored) / 2, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the random model is not mirror-symmetric
    prob = predict_probabilities(flipped, image, engine.input_size, engine.resize)
    np.testing.assert_allclose(prob, torch.sigmoid(both)[0, 0].numpy(), atol=1e-5)


def test_evaluate_dataset_summarises_the_test_split(tmp_path):
    dataset = str(tmp_path / "ds")
    split_of = {0: "train", 1: "test", 2: "test", 3: "test", 4: "val", 5: "test"}
    rows = write_synthetic_dataset(dataset, n=6, seed=1, max_side=72, split_for=split_of.get,
                                   cluster_for=lambda i, kind: None if i == 5 else f"c{i % 2}", quarantined=[3])
    url = _write_run(tmp_path / "run")
    summary = evaluate_dataset(url, dataset, split="test")
    test_rows = [r for r in rows if r["split"] == "test" and r["status"] == "ok"]
    assert summary["n"] == len(test_rows) == 3
    assert summary["split"] == "test" and summary["model_url"] == url and summary["dataset_url"] == dataset
    assert summary["clusters"] == {name: {"n": 1, "mean_iou": pytest.approx(summary["clusters"][name]["mean_iou"])}
                                   for name in ("all", "c0", "c1")}
    assert 0.0 <= summary["mean_iou"] <= 1.0 and len(summary["worst"]) == 3
    with pytest.raises(ValueError, match="no usable rows"):
        evaluate_dataset(url, dataset, split="nothing")


def test_evaluate_folder_pairs_by_stem_and_reports_skipped(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    rng = np.random.default_rng(1)
    for stem, ext in [("a", ".jpg"), ("b", ".png"), ("c", ".jpg")]:
        image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
        data = encode_jpeg(image) if ext == ".jpg" else cv2.imencode(".png", image)[1].tobytes()
        storage.write_bytes(str(images / f"{stem}{ext}"), data)
    for stem in ("a", "b", "orphan"):
        mask = np.zeros((120, 180), np.uint8)  # original resolution: twice the image
        mask[30:90, 40:140] = 255
        storage.write_bytes(str(masks / f"{stem}.png"), encode_png(mask))
    url = _write_run(tmp_path / "run")
    summary = evaluate_folder(url, str(images), str(masks))
    assert summary["n"] == 2 and summary["clusters"]["all"]["n"] == 2
    assert sorted(w["stem"] for w in summary["worst"]) == ["a", "b"]
    assert summary["skipped"] == ["c"] and summary["unmatched_masks"] == ["orphan"] and summary["unreadable"] == []
    with pytest.raises(ValueError, match="no image"):
        evaluate_folder(url, str(images), str(tmp_path / "empty"))
    # an empty image and a corrupt mask are left out with their reasons; the rest is scored
    storage.write_bytes(str(images / "empty.jpg"), b"")
    storage.write_bytes(str(masks / "empty.png"), storage.read_bytes(str(masks / "a.png")))
    storage.write_bytes(str(masks / "c.png"), b"not a png")
    summary = evaluate_folder(url, str(images), str(masks))
    assert summary["n"] == 2 and summary["unreadable"] == [
        {"stem": "c", "reason": f"cannot decode mask {masks / 'c.png'}"},
        {"stem": "empty", "reason": f"image {images / 'empty.jpg'} is an empty file"}]


def test_evaluate_folder_names_a_mask_that_is_not_a_png_and_reads_webp_photos(tmp_path):
    """A JPEG mask is left out with its reason (not counted as a missing mask); a WebP photo, which
    ``bgremoval remove`` reads, is scored."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    image = np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), np.uint8)
    mask[15:45, 20:70] = 255
    storage.write_bytes(str(images / "shot.webp"), cv2.imencode(".webp", image)[1].tobytes())
    storage.write_bytes(str(images / "lossy.jpg"), encode_jpeg(image))
    storage.write_bytes(str(masks / "shot.png"), encode_png(mask))
    storage.write_bytes(str(masks / "lossy.jpg"), encode_jpeg(np.dstack([mask] * 3)))
    summary = evaluate_folder(_write_run(tmp_path / "run"), str(images), str(masks))
    assert summary["n"] == 1 and [w["stem"] for w in summary["worst"]] == ["shot"]
    assert summary["skipped"] == [] and summary["unmatched_masks"] == []
    assert summary["unreadable"] == [{"stem": "lossy", "reason": f"mask {masks / 'lossy.jpg'} is not a PNG (masks are "
                                      "PNG only, as cleaning takes them: a JPEG's blocks blur the edges the IoU measures)"}]
    storage.write_bytes(str(tmp_path / "only-jpeg" / "shot.jpg"), encode_jpeg(np.dstack([mask] * 3)))
    with pytest.raises(ValueError, match=r"0 PNG masks, 1 masks in other formats"):
        evaluate_folder(_write_run(tmp_path / "run"), str(images), str(tmp_path / "only-jpeg"))


def test_refined_scores_follow_the_photos_edges_as_remove_publishes_them():
    """The model's square lands on photo pixels [64:192]; the product (and its mask) is [60:196].
    Scored refined, as ``bgremoval remove`` publishes, the IoU rises; also at a mask's larger size."""
    from tasks.model.refine import RefineConfig

    photo = np.full((256, 256, 3), 40, np.uint8)
    photo[60:196, 60:196] = 220
    truth = np.zeros((256, 256), np.uint8)
    truth[60:196, 60:196] = 255
    big_truth = cv2.resize(truth, (512, 512), interpolation=cv2.INTER_NEAREST)
    model = SquareModel(16, 48)
    plain, refined, big = (evaluate_pairs(model, [("a", None, photo, mask)], SIZE, refine=refine)[0]
                           for mask, refine in ((truth, None), (truth, RefineConfig()), (big_truth, RefineConfig())))
    assert plain.iou == pytest.approx((128 / 136) ** 2, abs=0.01)
    assert refined.iou > plain.iou + 0.02 and big.iou > plain.iou + 0.02
    prob = predict_probabilities(model, photo, SIZE, output_size=(512, 512), refine=RefineConfig())
    assert prob.shape == (512, 512) and prob.dtype == np.float32


def test_a_png_mask_is_scored_whatever_other_masks_share_its_stem(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    image = np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), np.uint8)
    mask[15:45, 20:70] = 255
    storage.write_bytes(str(images / "x.jpg"), encode_jpeg(image))
    storage.write_bytes(str(masks / "x.png"), encode_png(mask))
    storage.write_bytes(str(masks / "x.jpg"), encode_jpeg(np.dstack([mask] * 3)))
    storage.write_bytes(str(masks / "x.tif"), cv2.imencode(".tif", mask)[1].tobytes())
    summary = evaluate_folder(_write_run(tmp_path / "run"), str(images), str(masks))
    assert summary["n"] == 1 and summary["unreadable"] == []
