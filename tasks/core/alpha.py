"""Colours at a cut-out's soft edge: keep the old background out of them.

Where alpha is between 0 and 1 a photo's pixel mixes the product with the background it was shot
on, so a cut-out put on a new background shows a rim of the old one. Augmentation (new
backgrounds for training) and serving (the published cut-out and JPEG) both replace those
colours with the product's own, through :func:`decontaminated_foreground`; serving puts the
cut-out on a plain colour with :func:`over_colour`.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["decontaminated_foreground", "over_colour"]


def decontaminated_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Foreground colours without the old background (HxWx3 uint8).

    ``alpha`` is float in [0, 1] or uint8 in [0, 255]. Pixels with full alpha keep their colour;
    every other pixel takes the colour of the nearest pixel with full alpha, so the blended edge
    band carries product colour only and leaves no halo of the old background. With no
    full-alpha pixel at all the image is returned as is.
    """
    inner = alpha >= (255 if alpha.dtype == np.uint8 else 1.0)
    if not inner.any():
        return image.copy()
    _, labels = cv2.distanceTransformWithLabels(
        (~inner).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    lut = np.zeros((int(labels.max()) + 1, 3), np.uint8)
    lut[labels[inner]] = image[inner]
    return np.where(inner[..., None], image, lut[labels])


def over_colour(rgb: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` (``H×W×3`` uint8) over a plain ``colour`` by ``alpha`` (``H×W`` uint8): each pixel
    ``(rgb·α + colour·(255 − α)) / 255``, its two terms rounded apart (within one level of the exact
    blend). In uint8 throughout: a float weight map costs several times as much at a photo's size."""
    alpha3 = cv2.merge((alpha, alpha, alpha))
    backdrop = np.empty_like(rgb)
    backdrop[0] = colour
    backdrop[1:] = backdrop[0]  # row by row: numpy broadcasts a colour over a whole image ~30x slower
    product = cv2.multiply(np.ascontiguousarray(rgb), alpha3, scale=1 / 255)
    return cv2.add(product, cv2.multiply(backdrop, cv2.bitwise_not(alpha3), scale=1 / 255))
