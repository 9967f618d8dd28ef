"""Evaluation measures on hand-computed cases: IoU, MAE, boundary F, resize and the summary table."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluation.metrics import (
    ImageScore,
    boundary_f,
    boundary_tolerance,
    format_summary,
    iou,
    mae,
    resize_to_original,
    summarise,
)


def _square(shape=(40, 40), top=10, left=10, size=10, dtype=bool, fg=True) -> np.ndarray:
    mask = np.zeros(shape, dtype=dtype)
    mask[top : top + size, left : left + size] = fg
    return mask


# ---------------------------------------------------------------- IoU


def test_iou_perfect_bool_and_uint8():
    m = _square()
    assert iou(m, m) == 1.0
    assert iou(_square(dtype=np.uint8, fg=255), m) == 1.0


def test_iou_empty_cases():
    empty = np.zeros((8, 8), bool)
    assert iou(empty, empty) == 1.0
    one = empty.copy()
    one[3, 3] = True
    assert iou(empty, one) == 0.0
    assert iou(one, empty) == 0.0


def test_iou_disjoint_is_zero():
    assert iou(_square(left=0), _square(left=20)) == 0.0


def test_iou_half_overlap_exact():
    # Two 10x10 squares shifted by 5 columns: 50 px shared, union 150 px.
    a = _square(left=10)
    b = _square(left=15, dtype=np.uint8, fg=255)
    assert iou(a, b) == pytest.approx(50 / 150, abs=0)
    assert iou(b, a) == 50 / 150


def test_iou_tiny_object():
    a = np.zeros((100, 100), bool)
    a[50, 50] = True
    b = a.copy()
    assert iou(a, b) == 1.0
    b[50, 51] = True  # prediction one pixel too wide
    assert iou(a, b) == 0.5


def test_iou_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        iou(np.zeros((4, 5), bool), np.zeros((5, 4), bool))


# ---------------------------------------------------------------- MAE


def test_mae_exact_and_inverted():
    truth = _square()
    assert mae(truth.astype(np.float32), truth) == 0.0
    assert mae((~truth).astype(np.float64), truth) == 1.0
    assert mae(np.where(truth, 255, 0).astype(np.uint8), truth) == 0.0
    assert mae(np.where(truth, 0, 255).astype(np.uint8), truth) == 1.0


def test_mae_constant_half_and_uint8_scaling():
    truth = _square(dtype=np.uint8, fg=255)
    assert mae(np.full(truth.shape, 0.5, np.float32), truth) == pytest.approx(0.5)
    # 51/255 = 0.2 everywhere: error 0.2 on background (1500 px), 0.8 on 100 foreground px.
    prob = np.full(truth.shape, 51, np.uint8)
    assert mae(prob, truth) == pytest.approx((1500 * 0.2 + 100 * 0.8) / 1600, abs=1e-6)


def test_mae_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        mae(np.zeros((3, 3), np.float32), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mae(np.full((3, 3), 2.0), np.zeros((3, 3), bool))


# ---------------------------------------------------------------- boundary F


def test_boundary_tolerance_default():
    assert boundary_tolerance((40, 40)) == 1  # 0.0075 * 56.6 = 0.42 -> at least 1
    assert boundary_tolerance((1000, 1000)) == 11  # 0.0075 * 1414.2 = 10.6


def test_boundary_f_identical_is_one():
    m = _square(size=20)
    assert boundary_f(m, m) == 1.0


def test_boundary_f_one_pixel_shift_within_tolerance():
    truth = _square(size=20)
    down = _square(top=11, size=20)
    assert boundary_f(down, truth, tolerance_px=1) == 1.0
    assert boundary_f(down, truth) == 1.0  # default tolerance is 1 px at 40x40
    diagonal = _square(top=11, left=11, size=20)  # corners move by sqrt(2)
    assert boundary_f(diagonal, truth, tolerance_px=2) == 1.0
    assert boundary_f(diagonal, truth, tolerance_px=1) < 1.0


def test_boundary_f_far_shift_is_low():
    truth = _square(shape=(100, 100), top=10, left=10, size=20)
    far = _square(shape=(100, 100), top=60, left=60, size=20)
    assert boundary_f(far, truth, tolerance_px=2) == 0.0


def test_boundary_f_exact_tolerance_zero():
    truth = _square(size=20)
    down = _square(top=11, size=20)
    # Tolerance 0: each boundary is a 20x20 ring of 76 px; they share cols 10 and 29 over
    # rows 11..29 (19 px each), so precision = recall = 38/76.
    assert boundary_f(down, truth, tolerance_px=0) == pytest.approx(38 / 76)


def test_boundary_f_empty_cases():
    empty = np.zeros((20, 20), bool)
    full = np.ones((20, 20), bool)
    obj = _square(shape=(20, 20), top=5, left=5, size=5)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(full, full) == 1.0
    assert boundary_f(empty, full) == 0.0
    assert boundary_f(empty, obj) == 0.0
    assert boundary_f(obj, empty) == 0.0


def test_boundary_f_frame_is_not_a_boundary():
    # An object cut by the bottom edge: only its top and sides are contours.
    truth = np.zeros((30, 30), bool)
    truth[10:, 5:25] = True
    assert boundary_f(truth, truth) == 1.0
    pred = truth.copy()
    pred[29, :] = True  # a strip along the frame: its top edge is a real, wrong contour
    assert boundary_f(pred, truth, tolerance_px=0) < 1.0


def test_boundary_f_validation():
    with pytest.raises(ValueError, match="shapes differ"):
        boundary_f(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        boundary_f(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="tolerance_px"):
        boundary_f(np.zeros((4, 4)), np.zeros((4, 4)), tolerance_px=-1)


# ---------------------------------------------------------------- resize


def test_resize_to_original_shape_and_range():
    rng = np.random.default_rng(0)
    prob = rng.random((32, 32)).astype(np.float32)
    out = resize_to_original(prob, (120, 80))  # (width, height)
    assert out.shape == (80, 120)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_resize_to_original_uint8_channel_and_constant():
    prob = np.full((16, 16, 1), 255, np.uint8)
    out = resize_to_original(prob, (7, 9))
    assert out.shape == (9, 7)
    np.testing.assert_allclose(out, 1.0)
    same = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(resize_to_original(same, (4, 3)), same)
    with pytest.raises(ValueError, match="size"):
        resize_to_original(same, (0, 3))


# ---------------------------------------------------------------- summary


def _scores() -> list[ImageScore]:
    ious = {"a": 1.0, "b": 0.99, "c": 0.98, "d": 0.97, "e": 0.96, "f": 0.95, "g": 0.90, "h": 0.50}
    clusters = {"a": "shorts", "b": "shorts", "c": "shorts", "d": "tops", "e": "tops",
                "f": "tops", "g": "tops", "h": "bags"}
    return [ImageScore(stem, clusters[stem], v, mae=0.01 * i, boundary_f=0.5 + 0.05 * i)
            for i, (stem, v) in enumerate(ious.items())]


def test_summarise_shares_means_clusters_worst():
    s = summarise(_scores(), worst=3)
    assert s["n"] == 8
    assert s["mean_iou"] == pytest.approx((1.0 + 0.99 + 0.98 + 0.97 + 0.96 + 0.95 + 0.90 + 0.50) / 8)
    assert s["share_at_least"] == {0.95: 6 / 8, 0.97: 4 / 8, 0.99: 2 / 8}
    assert s["mean_mae"] == pytest.approx(0.01 * sum(range(8)) / 8)
    assert s["mean_boundary_f"] == pytest.approx(0.5 + 0.05 * 3.5)
    assert list(s["clusters"]) == ["bags", "shorts", "tops"]
    assert s["clusters"]["bags"] == {"n": 1, "mean_iou": 0.5}
    assert s["clusters"]["shorts"]["n"] == 3
    assert s["clusters"]["shorts"]["mean_iou"] == pytest.approx(0.99)
    assert s["clusters"]["tops"]["n"] == 4
    assert s["clusters"]["tops"]["mean_iou"] == pytest.approx((0.97 + 0.96 + 0.95 + 0.90) / 4)
    assert [w["stem"] for w in s["worst"]] == ["h", "g", "f"]
    assert s["worst"][0] == {"stem": "h", "cluster": "bags", "iou": 0.5}


def test_summarise_worst_ties_by_stem_and_default_count():
    scores = [ImageScore(f"s{i:02d}", "c", 0.9, 0.0, 1.0) for i in (3, 1, 2)]
    s = summarise(scores, thresholds=(0.9,))
    assert s["share_at_least"] == {0.9: 1.0}
    assert [w["stem"] for w in s["worst"]] == ["s01", "s02", "s03"]
    assert len(summarise(_scores())["worst"]) == 8  # fewer images than the default 16


def test_summarise_validation():
    with pytest.raises(ValueError, match="at least one"):
        summarise([])
    with pytest.raises(ValueError, match="thresholds"):
        summarise(_scores(), thresholds=(95,))
    with pytest.raises(ValueError, match="worst"):
        summarise(_scores(), worst=-1)


def test_format_summary_contains_the_numbers():
    text = format_summary(summarise(_scores(), worst=2))
    first = text.splitlines()[0]
    assert first == "n 8 | mean IoU 90.625 % | ≥95 %: 75.0 % | ≥97 %: 50.0 % | ≥99 %: 25.0 %"
    assert "mean MAE 0.0350 | mean boundary F 0.6750" in text
    assert "per cluster:" in text
    assert "bags" in text and "50.000 %" in text
    assert "99.000 %" in text  # shorts
    assert "94.500 %" in text  # tops
    assert "worst 2:" in text and "h  (bags)  IoU 50.000 %" in text
