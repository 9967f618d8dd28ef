"""``tasks.core.alpha``: soft-edge colours come from the product, for float and uint8 alpha; the blend over a plain colour."""

from __future__ import annotations

import numpy as np

from tasks.core.alpha import decontaminated_foreground, over_colour


def test_edge_pixels_take_the_nearest_full_alpha_colour():
    image = np.zeros((5, 7, 3), np.uint8)
    image[:, :3] = (0, 0, 255)  # product: blue on the left
    image[:, 3:] = (255, 0, 0)  # old background: red
    alpha = np.zeros((5, 7), np.float32)
    alpha[:, :3], alpha[:, 3], alpha[:, 4] = 1.0, 0.6, 0.2
    for a in (alpha, np.round(alpha * 255).astype(np.uint8)):
        fg = decontaminated_foreground(image, a)
        assert (fg[:, :5] == (0, 0, 255)).all()  # the edge band is the product's blue
        assert (image[:, 3:] == (255, 0, 0)).all()  # the input is untouched


def test_no_full_alpha_returns_a_copy():
    image = np.full((3, 3, 3), 7, np.uint8)
    out = decontaminated_foreground(image, np.full((3, 3), 0.5, np.float32))
    assert (out == image).all() and out is not image


def test_over_colour_is_within_one_level_of_the_exact_blend():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    alpha[:5] = 0
    alpha[-5:] = 255
    colour = (255, 128, 0)
    out = over_colour(rgb, alpha, colour)
    weight = alpha[..., None] / 255.0
    exact = rgb * weight + np.asarray(colour, float) * (1 - weight)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.abs(out - exact).max() <= 1.0
    np.testing.assert_array_equal(out[:5], np.broadcast_to(np.asarray(colour, np.uint8), out[:5].shape))
    np.testing.assert_array_equal(out[-5:], rgb[-5:])


def test_over_colour_takes_a_strided_view_and_a_single_row():
    rgb = np.arange(2 * 8 * 3, dtype=np.uint8).reshape(2, 8, 3)[:, ::2]
    alpha = np.full((2, 4), 255, np.uint8)
    np.testing.assert_array_equal(over_colour(rgb, alpha, (0, 0, 0)), rgb)
    row = over_colour(rgb[:1], np.zeros((1, 4), np.uint8), (9, 8, 7))
    np.testing.assert_array_equal(row, np.broadcast_to(np.asarray((9, 8, 7), np.uint8), (1, 4, 3)))
