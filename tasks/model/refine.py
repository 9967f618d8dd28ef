"""Edge refinement: the network's probability map, resized to the photo, pulled onto the photo's edges.

U2-Net sees a photo at its input size (320 px); the map it returns is resized back to the photo
bilinearly, so its outline is only as precise as the network's grid, and on a photo several times
that size it is visibly soft. A guided filter (He, Sun and Tang, *Guided Image Filtering*, 2013)
with the photo's luminance as the guide fits the map, in every window of ``(2r + 1)²`` pixels, as a
linear function of the luminance: where the photo has an edge, the map's transition moves onto it;
where it has none, the map is smoothed a little. Box filters only, so the cost grows with the pixels
and not with the radius.

The radius grows with the photo above the network's input size: a photo four times the input size
gets four times the radius, so the filter reaches as far as the network's own uncertainty. Measured
on real photos (``benchmarks/edge_refinement.py``; ``benchmarks/README.md``): a radius of 2 with
``eps`` 1e-3 adds 0.1-0.2 point of mean IoU on packshots and on people with the published weights
and a short fine-tune, for about 2 ms a photo, and takes 0.1 point on people from a model whose
outline is already tight; wider windows start to lose thin parts. Whether a model's cut-outs are
refined is measured per model (:mod:`tasks.model.refine_choice`).
"""

from __future__ import annotations

import cv2
import numpy as np

from tasks.model.preprocess import resize_to_original
from tasks.model.refine_choice import RefineConfig

__all__ = ["GRID_SCALE", "RefineConfig", "guided_filter", "map_at_photo", "refine_probability"]

#: Above this many times the network input, the filter's coefficients are fitted on a coarser grid.
GRID_SCALE = 2


def _coefficients(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The guided filter's window-averaged linear coefficients: ``src ≈ slope · guide + offset``."""
    window = (2 * radius + 1, 2 * radius + 1)

    def mean(arr: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(arr, cv2.CV_32F, window, borderType=cv2.BORDER_REFLECT)

    mean_guide, mean_src = mean(guide), mean(src)
    variance = mean(guide * guide) - mean_guide * mean_guide
    covariance = mean(guide * src) - mean_guide * mean_src
    slope = covariance / (variance + np.float32(eps))
    offset = mean_src - slope * mean_guide
    return mean(slope), mean(offset)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter of ``src`` by ``guide`` (both ``H×W`` float32), window
    ``(2·radius + 1)²``, regularisation ``eps``. Returns float32 ``H×W`` (not clipped)."""
    if guide.shape != src.shape or guide.ndim != 2:
        raise ValueError(f"guide and src must be two H×W maps of one size, got {guide.shape} and {src.shape}")
    if radius < 1:
        raise ValueError(f"radius must be at least 1, got {radius}")
    slope, offset = _coefficients(guide, src, radius, eps)
    return slope * guide + offset


def _grid(height: int, width: int, input_size: int) -> tuple[int, int]:
    """``(width, height)`` of the grid the filter's coefficients are fitted on: the photo itself up
    to twice the network input, else the photo shrunk to twice the input (He and Sun's *fast* guided
    filter: the coefficients vary slowly, so they are fitted on a coarser grid and upsampled)."""
    factor = max(height, width) / (GRID_SCALE * input_size)
    if factor <= 1:
        return width, height
    return max(1, round(width / factor)), max(1, round(height / factor))


def refine_probability(prob: np.ndarray, image_rgb: np.ndarray, input_size: int,
                       config: RefineConfig = RefineConfig()) -> np.ndarray:
    """The probability map ``prob`` (float ``h×w`` in [0, 1], at the network's output size or
    already at the photo's) at the size of ``image_rgb`` (``H×W×3`` uint8), refined on the photo's
    edges, for a network whose input is ``input_size`` pixels square. Returns float32 ``H×W`` in
    [0, 1] (it replaces :func:`tasks.model.preprocess.resize_to_original`). Above twice the input
    size the filter's coefficients are fitted on a grid of twice the input size and upsampled, so a
    large photo costs a fraction of the full-size filter (about 14 against 45 ms on one thread at
    1000×1333; the plain resize takes 3)."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2 or prob.size == 0:
        raise ValueError(f"probability map must be a non-empty 2-D array, got shape {prob.shape}")
    height, width = image_rgb.shape[:2]
    radius = max(1, round(config.radius * max(1.0, max(height, width) / float(input_size))))
    grey = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    grid_w, grid_h = _grid(height, width, input_size)
    if (grid_w, grid_h) == (width, height):
        luminance = grey.astype(np.float32) * np.float32(1 / 255)
        refined = guided_filter(luminance, resize_to_original(prob, (width, height)), radius, config.eps)
        return np.clip(refined, 0.0, 1.0, out=refined)
    shrink = grid_w / width
    guide = cv2.resize(grey, (grid_w, grid_h), interpolation=cv2.INTER_AREA).astype(np.float32) * np.float32(1 / 255)
    interpolation = cv2.INTER_AREA if prob.shape[1] > grid_w else cv2.INTER_LINEAR
    on_grid = cv2.resize(prob, (grid_w, grid_h), interpolation=interpolation)
    slope, offset = _coefficients(guide, on_grid, max(1, round(radius * shrink)), config.eps)
    slope *= np.float32(1 / 255)  # applied to the uint8 luminance below, never converted at full size
    refined = cv2.multiply(cv2.resize(slope, (width, height), interpolation=cv2.INTER_LINEAR), grey, dtype=cv2.CV_32F)
    refined += cv2.resize(offset, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(refined, 0.0, 1.0, out=refined)


def map_at_photo(prob: np.ndarray, image_rgb: np.ndarray, input_size: int, refine: RefineConfig | None,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """The network's map ``prob`` at the photo's size, as a cut-out is published: refined on the
    edges of ``image_rgb`` (uint8) with ``refine``, or only resized (bilinear) when ``refine`` is
    None. ``size = (width, height)`` asks for another size than the photo's (e.g. a full-size mask's):
    the photo is then resized to it for the refinement."""
    width, height = size or (image_rgb.shape[1], image_rgb.shape[0])
    if refine is None:
        return resize_to_original(prob, (width, height))
    if image_rgb.shape[:2] != (height, width):
        image_rgb = cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    return refine_probability(prob, image_rgb, input_size, refine)
