"""``tasks.core.alpha``: soft-edge colours come from the product, for float and uint8 alpha."""

from __future__ import annotations

import numpy as np

from tasks.core.alpha import decontaminated_foreground


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
