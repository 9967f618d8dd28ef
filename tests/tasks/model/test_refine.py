"""Edge refinement: the map's outline moves onto the photo's edge, and nowhere without one."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tasks.model.refine import RefineConfig, guided_filter, refine_probability


def _crossing(row: np.ndarray) -> float:
    """Where a rising 1-D profile crosses 0.5, interpolated between pixels."""
    i = int(np.argmax(row >= 0.5))
    return i - 1 + (0.5 - row[i - 1]) / (row[i] - row[i - 1])


def _soft_map(width: int, height: int, centre: float, softness: float) -> np.ndarray:
    x = np.arange(width, dtype=np.float32)
    return np.tile(1 / (1 + np.exp(-(x - centre) / softness)), (height, 1)).astype(np.float32)


def _photo(width: int, height: int, edge: int | None) -> np.ndarray:
    image = np.full((height, width, 3), 60, np.uint8)
    if edge is not None:
        image[:, edge:] = 200
    return image


def test_the_outline_moves_towards_the_photos_edge():
    prob = _soft_map(120, 40, centre=63.0, softness=2.5)  # the network's outline 3 px right of the edge
    refined = refine_probability(prob, _photo(120, 40, edge=60), input_size=120, config=RefineConfig(radius=4))
    before, after = _crossing(prob[20]), _crossing(refined[20])
    assert before == pytest.approx(63.0, abs=0.01)
    assert 59.5 < after < before - 0.75, after  # the photo's edge lies between pixels 59 and 60
    assert refined[20, 60] - refined[20, 59] > 0.25  # the map now steps where the photo does
    wider = refine_probability(prob, _photo(120, 40, edge=60), input_size=120, config=RefineConfig(radius=8))
    assert abs(_crossing(wider[20]) - 59.5) < 0.75  # a window wider than the offset reaches the edge
    assert refined.dtype == np.float32 and refined.shape == prob.shape
    assert refined.min() >= 0.0 and refined.max() <= 1.0


def test_without_an_edge_the_outline_stays():
    prob = _soft_map(120, 40, centre=63.0, softness=2.5)
    refined = refine_probability(prob, _photo(120, 40, edge=None), input_size=120)
    assert _crossing(refined[20]) == pytest.approx(63.0, abs=0.25)


def test_the_radius_grows_with_the_photo_above_the_input_size():
    """A photo four times the network input gets four times the window: the same edge and the
    same outline offset, scaled by four, end up in the same place relative to the photo."""
    small = refine_probability(_soft_map(120, 8, 63.0, 2.5), _photo(120, 8, 60), input_size=120)
    large = refine_probability(_soft_map(480, 8, 252.0, 10.0), _photo(480, 8, 240), input_size=120)
    assert _crossing(large[4]) / 4 == pytest.approx(_crossing(small[4]), abs=0.3)


def test_a_map_at_the_networks_size_comes_back_at_the_photos():
    """The map may come straight from the network: it is resized and refined in one step, and on a
    photo within twice the input size that equals refining the resized map."""
    from tasks.model.preprocess import resize_to_original

    rng = np.random.default_rng(1)
    small = rng.random((32, 32), dtype=np.float32)
    photo = _photo(60, 50, edge=25)
    direct = refine_probability(small, photo, input_size=32)
    assert direct.shape == (50, 60)
    np.testing.assert_allclose(direct, refine_probability(resize_to_original(small, (60, 50)), photo, 32), atol=1e-6)


def test_a_large_photo_is_refined_on_a_coarser_grid_much_like_the_full_one():
    """Eight times the input size: the coefficients are fitted at twice the input and upsampled
    (the fast guided filter); the outline lands where the full-resolution filter puts it."""
    prob = _soft_map(960, 16, centre=488.0, softness=8.0)  # one network pixel (8 photo px) right of the edge
    photo = _photo(960, 16, edge=480)
    fast = refine_probability(prob, photo, input_size=120)
    full = np.clip(guided_filter(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255, prob, 16, 1e-3), 0, 1)
    assert abs(_crossing(full[8]) - 479.5) < 2  # the full filter's window (r = 2 x 8) reaches the edge
    assert _crossing(fast[8]) == pytest.approx(_crossing(full[8]), abs=1.5)


def test_the_guided_filter_keeps_a_map_that_is_already_linear_in_the_guide():
    rng = np.random.default_rng(0)
    guide = rng.random((50, 60), dtype=np.float32)
    out = guided_filter(guide, 0.25 + 0.5 * guide, radius=3, eps=1e-6)
    np.testing.assert_allclose(out, 0.25 + 0.5 * guide, atol=1e-3)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        refine_probability(np.zeros((10, 10, 2), np.float32), np.zeros((10, 12, 3), np.uint8), 320)
    with pytest.raises(ValueError, match="radius"):
        RefineConfig(radius=0)
    with pytest.raises(ValueError, match="eps"):
        RefineConfig(eps=0)
    with pytest.raises(ValueError, match="radius"):
        guided_filter(np.zeros((5, 5), np.float32), np.zeros((5, 5), np.float32), 0, 1e-3)
