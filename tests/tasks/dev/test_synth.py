"""Tests of the synthetic catalogue: determinism, exact aligned masks, shapes by type, files."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.core import storage
from tasks.dev import synth
from tasks.dev.synth import PRODUCT_TYPES, SynthConfig, generate_catalogue, render_item

SMALL = 256


@pytest.fixture(scope="module")
def catalogue_items() -> list[synth.SynthItem]:
    """Sixty small products of one seed, rendered once for the whole module."""
    config = SynthConfig(n=60, seed=11, max_side=SMALL)
    return [render_item(i, config) for i in range(config.n)]


def _boundary_rings(mask: np.ndarray, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Pixels just inside and just outside the mask edge (rings ``width`` px wide)."""
    kernel = np.ones((3, 3), np.uint8)
    inner = (mask > 0) & ~(cv2.erode(mask, kernel, iterations=width) > 0)
    outer = (cv2.dilate(mask, kernel, iterations=width) > 0) & ~(mask > 0)
    return inner, outer


def _edge_strength(image: np.ndarray, mask: np.ndarray, dx: int, dy: int) -> float:
    """Mean image gradient magnitude along the mask outline shifted by (dx, dy) pixels."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = cv2.magnitude(gx, gy)
    outline = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((2, 2), np.uint8)) > 0
    shifted = np.roll(np.roll(outline, dy, axis=0), dx, axis=1)
    return float(magnitude[shifted].mean())


def test_same_seed_gives_identical_arrays_and_other_seed_differs() -> None:
    config = SynthConfig(n=4, seed=7, max_side=SMALL)
    for index in range(4):
        a, b = render_item(index, config), render_item(index, config)
        assert a.stem == b.stem == f"sku-7-{index:05d}"
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.mask, b.mask)
        assert (a.product_type, a.background, a.pattern) == (b.product_type, b.background, b.pattern)
    other = render_item(0, SynthConfig(n=4, seed=8, max_side=SMALL))
    first = render_item(0, config)
    assert first.image.shape != other.image.shape or not np.array_equal(first.image, other.image)


def test_masks_are_binary_sized_like_the_image_and_partial(catalogue_items: list[synth.SynthItem]) -> None:
    for item in catalogue_items:
        assert item.image.dtype == np.uint8 and item.image.ndim == 3 and item.image.shape[2] == 3
        assert item.mask.dtype == np.uint8 and item.mask.ndim == 2
        assert item.mask.shape == item.image.shape[:2]
        assert set(np.unique(item.mask).tolist()) <= {0, 255}
        share = float((item.mask > 0).mean())
        assert 0.01 < share < 0.9, (item.stem, share)
        assert max(item.image.shape[:2]) <= SMALL


def test_mask_edge_sits_on_the_image_edge(catalogue_items: list[synth.SynthItem]) -> None:
    """The strongest image gradient lies on the mask outline itself, not a shifted copy of it."""
    ratios = []
    for item in catalogue_items:
        if item.product_type == "light_coloured":
            continue
        inner, outer = _boundary_rings(item.mask)
        contrast = np.abs(item.image[inner].mean(axis=0) - item.image[outer].mean(axis=0)).max()
        if contrast < 40:
            continue
        at_zero = _edge_strength(item.image, item.mask, 0, 0)
        shifted = [_edge_strength(item.image, item.mask, d * sx, d * sy)
                   for d in (2, 3) for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        assert at_zero > max(shifted), (item.stem, at_zero, shifted)
        ratios.append(at_zero / max(shifted))
    assert len(ratios) >= 20
    assert np.median(ratios) > 1.2, ratios


def test_dark_garment_on_white_differs_strongly_across_the_mask_edge() -> None:
    config = SynthConfig(n=200, seed=3, max_side=SMALL)
    found = 0
    for index in range(config.n):
        item = render_item(index, config)
        if item.background != "white" or item.pattern != "solid":
            continue
        inner, outer = _boundary_rings(item.mask)
        inside, outside = item.image[inner].mean(), item.image[outer].mean()
        if inside > 120:
            continue
        assert outside - inside > 80, (item.stem, inside, outside)
        assert outside > 200
        found += 1
        if found == 3:
            break
    assert found == 3


def test_light_products_are_faint_but_visible(catalogue_items: list[synth.SynthItem]) -> None:
    light = [item for item in catalogue_items if item.product_type == "light_coloured"]
    assert len(light) >= 4
    for item in light:
        inner, outer = _boundary_rings(item.mask)
        inside = item.image[inner].astype(np.float32).mean(axis=0)
        outside = item.image[outer].astype(np.float32).mean(axis=0)
        assert inside.min() > 150 and outside.min() > 150, item.stem
        assert 3.0 < np.abs(inside - outside).max() < 80.0, (item.stem, inside, outside)
        assert item.background in ("white", "light_grey", "cream")


def test_every_type_occurs_and_masks_differ_by_type(catalogue_items: list[synth.SynthItem]) -> None:
    stats: dict[str, list[tuple[float, float, float]]] = {t: [] for t in PRODUCT_TYPES}
    for item in catalogue_items:
        ys, xs = np.nonzero(item.mask)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        row_widths = (item.mask[ys.min():ys.max() + 1] > 0).sum(axis=1)
        widest_row = float(np.argmax(row_widths)) / height
        stats[item.product_type].append((height / width, widest_row, float((item.mask > 0).mean())))
    assert all(stats[t] for t in PRODUCT_TYPES), {t: len(v) for t, v in stats.items()}
    median = {t: np.median(np.array(v), axis=0) for t, v in stats.items()}
    assert median["long_pants"][0] > 1.8                       # tall
    assert median["long_pants"][0] > 2.0 * median["shorts"][0]  # shorts are short and wide
    assert median["short_sleeved"][1] < 0.35                   # widest across the sleeves, near the top
    assert median["long_sleeved"][1] > 0.5                     # sleeves reach down: widest low
    assert median["beachwear_accessories"][2] < median["short_sleeved"][2]  # smaller items


def test_pants_have_two_legs_with_a_gap(catalogue_items: list[synth.SynthItem]) -> None:
    pants = [item for item in catalogue_items if item.product_type == "long_pants"]
    assert pants
    for item in pants:
        ys, _ = np.nonzero(item.mask)
        row = item.mask[int(ys.min() + 0.9 * (ys.max() - ys.min()))] > 0
        runs = np.count_nonzero(np.diff(row.astype(np.int8)) == 1) + int(row[0])
        assert runs == 2, item.stem


def test_type_shares_follow_the_catalogue_weights() -> None:
    counts = Counter(synth.product_type_for(i, 5) for i in range(2000))
    for name, weight in synth.TYPE_WEIGHTS.items():
        assert abs(counts[name] / 2000 - weight) < 0.02, (name, counts[name])
    assert counts["beachwear_accessories"] < counts["short_sleeved"]


def test_sizes_and_aspect_ratios_vary(catalogue_items: list[synth.SynthItem]) -> None:
    shapes = {item.image.shape[:2] for item in catalogue_items}
    ratios = {round(h / w, 2) for h, w in shapes}
    assert len(ratios) >= 3
    assert any(h > w for h, w in shapes) and any(h == w for h, w in shapes)
    full = [synth.pick_size(np.random.default_rng([1, i]), 1333) for i in range(200)]
    long_sides = [max(size) for size in full]
    assert min(long_sides) >= 480 and max(long_sides) <= 1333
    assert any(w > h for w, h in full)


def test_long_side_scales_every_canvas_up_or_down_to_it() -> None:
    for long_side in (2000, 400):
        sizes = [synth.pick_size(np.random.default_rng([1, i]), 1333, long_side) for i in range(50)]
        assert {max(size) for size in sizes} == {long_side}
        assert len({round(w / h, 2) for w, h in sizes}) >= 3  # the catalogue's aspects are kept
    item = render_item(3, SynthConfig(n=4, seed=2, long_side=1600))
    assert max(item.image.shape[:2]) == 1600 and item.mask.shape == item.image.shape[:2]
    assert 0 < np.count_nonzero(item.mask) < item.mask.size
    with pytest.raises(ValueError, match="long_side"):
        SynthConfig(n=1, long_side=16)


def test_backgrounds_and_patterns_vary(catalogue_items: list[synth.SynthItem]) -> None:
    assert len({item.background for item in catalogue_items}) >= 4
    assert len({item.pattern for item in catalogue_items}) >= 5


def _read_truth(folder: Path) -> list[dict]:
    with open(folder / "truth.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_generate_catalogue_writes_valid_files_truth_and_ready_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real_write = storage.write_bytes

    def recording_write(url: str, data: bytes, storage_options: dict | None = None) -> str:
        written.append(url)
        return real_write(url, data, storage_options)

    monkeypatch.setattr(storage, "write_bytes", recording_write)
    batch = tmp_path / "raw" / "demo"
    config = SynthConfig(n=12, seed=4, max_side=SMALL)
    summary = generate_catalogue(str(batch), config, progress=True)

    assert written[-1].endswith("/_READY") and written[-2].endswith("/truth.csv")
    assert (batch / "_READY").read_bytes() == b""
    assert summary["batch_url"] == str(batch)
    assert summary["n_good"] == 12 and summary["n_bad"] == 0
    assert sum(summary["per_type"].values()) == 12 and set(summary["per_type"]) == set(PRODUCT_TYPES)

    rows = _read_truth(batch)
    assert list(rows[0]) == list(synth.TRUTH_COLUMNS)
    assert [r["stem"] for r in rows] == [f"sku-4-{i:05d}" for i in range(12)]
    assert sorted(p.stem for p in (batch / "images").iterdir()) == [r["stem"] for r in rows]
    assert sorted(p.stem for p in (batch / "masks").iterdir()) == [r["stem"] for r in rows]
    present = {name: count for name, count in summary["per_type"].items() if count}
    assert Counter(r["product_type"] for r in rows) == Counter(present)
    for row in rows:
        assert row["expected_reason"] == ""
        with Image.open(batch / "images" / f"{row['stem']}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (int(row["width"]), int(row["height"]))
        with Image.open(batch / "masks" / f"{row['stem']}.png") as mask:
            assert mask.format == "PNG" and mask.mode == "L"
            assert mask.size == (int(row["width"]), int(row["height"]))
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


def test_generate_catalogue_is_byte_identical_for_the_same_config(tmp_path: Path) -> None:
    config = SynthConfig(n=5, seed=9, max_side=SMALL)
    generate_catalogue(str(tmp_path / "a"), config)
    generate_catalogue(str(tmp_path / "b"), config)
    files_a = sorted(o.relpath for o in storage.list_objects(str(tmp_path / "a")))
    files_b = sorted(o.relpath for o in storage.list_objects(str(tmp_path / "b")))
    assert files_a == files_b and len(files_a) == 2 * 5 + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_jpeg_quality_setting_is_used() -> None:
    item = render_item(0, SynthConfig(n=1, seed=2, max_side=SMALL))
    high, low = synth.encode_jpeg(item.image, 92), synth.encode_jpeg(item.image, 40)
    assert len(high) > len(low)
    decoded = np.asarray(Image.open(io.BytesIO(high)).convert("RGB")).astype(np.int16)
    assert np.abs(decoded - item.image).mean() < 3.0


def test_generate_catalogue_adds_bad_inputs_to_the_truth(tmp_path: Path) -> None:
    badinputs = pytest.importorskip("tasks.dev.badinputs", reason="tasks.dev.badinputs is not written yet")
    batch = tmp_path / "drop"
    summary = generate_catalogue(str(batch), SynthConfig(n=4, seed=1, bad=5, max_side=SMALL))
    rows = _read_truth(batch)
    good = [r for r in rows if r["product_type"]]
    bad = [r for r in rows if not r["product_type"]]
    assert summary["n_good"] == len(good) == 4
    assert summary["n_bad"] == len(bad) == 5
    expected = [(case.stem, case.expected_reason) for case in badinputs.make_bad_inputs(5, 1)]
    assert [(r["stem"], r["expected_reason"]) for r in bad] == expected
    assert all(not r["width"] and not r["height"] and not r["background"] for r in bad)
    assert all(not r["expected_reason"] for r in good)
    assert (batch / "_READY").read_bytes() == b""
