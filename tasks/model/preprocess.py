"""The one preprocessing: how an RGB photo becomes the network input, and how the network's
probability map goes back to the photo's size.

Training (:class:`tasks.train.data.SegmentationDataset`), scoring (:mod:`tasks.evaluation.scoring`),
both serving engines (:mod:`tasks.serving.engines`) and the ONNX export's metadata
(:mod:`tasks.model.export`) take the ImageNet mean/std, the resize modes, the resize itself and
the letterbox geometry from here. :func:`preprocess` is the reference (scale to [0, 1],
normalise, resize to the square input); :func:`prepare_input` is the same map (to 1/512 of a level)
computed faster on ``uint8`` photos (resized first, in 16-bit integers); :func:`resize_to_original` brings a probability map back.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from tasks.model.config import RESIZE_MODES

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "as_probability",
    "check_image",
    "letterbox_box",
    "prepare_input",
    "preprocess",
    "resize_to_original",
    "squeeze_channel",
    "training_resize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def _shrinks(array: np.ndarray, width: int, height: int) -> bool:
    """Whether resizing ``array`` to ``width×height`` shrinks it (no side grows)."""
    return width <= array.shape[1] and height <= array.shape[0]


def training_resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize as training does: area interpolation when shrinking, bilinear otherwise."""
    interpolation = cv2.INTER_AREA if _shrinks(array, width, height) else cv2.INTER_LINEAR
    return cv2.resize(array, (width, height), interpolation=interpolation)


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``height×width`` image lands in a ``size`` square, longer side fitted and
    centred: returns ``(x0, y0, new_width, new_height)``."""
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return (size - new_w) // 2, (size - new_h) // 2, new_w, new_h


def check_image(image_rgb: np.ndarray) -> np.ndarray:
    """``image_rgb`` as an array; ``ValueError`` unless it is a non-empty ``H×W×3`` image."""
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be a non-empty H×W×3 RGB array, got shape {image.shape}")
    return image


def preprocess(image_rgb: np.ndarray, input_size: int, resize: str = "stretch") -> np.ndarray:
    """Turn an ``H×W×3`` RGB ``uint8`` image into the network input exactly as training does.

    Scales to [0, 1] (``uint8`` divided by 255; float images are taken as already in [0, 1]),
    normalises with the ImageNet mean/std and resizes to ``input_size`` square (``"stretch"``, or
    ``"letterbox"``: longer side to ``input_size``, centred, zero padding). Returns float32
    ``3×S×S``. Raises ``ValueError`` for a non-RGB array or an unknown ``resize``.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    image = check_image(image_rgb)
    scaled = image.astype(np.float32) * np.float32(1 / 255) if image.dtype == np.uint8 else image.astype(np.float32)
    normed = (scaled - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    size = int(input_size)
    if resize == "stretch":
        out = training_resize(normed, size, size)
    else:
        x0, y0, new_w, new_h = letterbox_box(image.shape[0], image.shape[1], size)
        out = np.zeros((size, size, 3), np.float32)
        out[y0:y0 + new_h, x0:x0 + new_w] = training_resize(normed, new_w, new_h)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def prepare_input(image_rgb: np.ndarray, input_size: int, resize: str = "stretch",
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """The network input of one RGB ``uint8`` image: float32 ``3×S×S``.

    :func:`preprocess` for the ImageNet mean/std (to 1/512 of a level, about 3.5e-5 after normalising),
    computed the other way round: the photo is resized first (both steps are linear) and normalised
    at the input size. A photo larger than the input is shrunk in 16-bit integers, not through a
    full-size float copy (a 1000×1333 photo's took twice the rest of the step, most of it in memory
    traffic). ``mean``/``std`` default to the ImageNet values. Other dtypes and shapes go to
    :func:`preprocess`.
    """
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        return preprocess(image_rgb, input_size, resize)
    size = int(input_size)
    m = np.asarray(mean if mean is not None else IMAGENET_MEAN, np.float32) * np.float32(255)
    s = np.asarray(std if std is not None else IMAGENET_STD, np.float32) * np.float32(255)
    if resize == "stretch":
        return _normalised_planes(_resized(image_rgb, size, size), m, s)
    if resize == "letterbox":
        x0, y0, new_w, new_h = letterbox_box(image_rgb.shape[0], image_rgb.shape[1], size)
        out = np.zeros((3, size, size), np.float32)
        out[:, y0:y0 + new_h, x0:x0 + new_w] = _normalised_planes(_resized(image_rgb, new_w, new_h), m, s)
        return out
    raise ValueError(f"resize must be 'stretch' or 'letterbox', got {resize!r}")


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """:func:`training_resize` of a ``uint8`` photo, as float32 levels (0-255). Shrinking averages
    ``uint16`` pixels holding each level × 256 (half the bytes of a float32 copy to write and read
    again), rounded to 1/256 of a level: within 1/512 of the float resize. Enlarging (a photo
    smaller than the input; OpenCV's bilinear on integers works in fixed point) resizes float32."""
    if _shrinks(image, width, height):
        shrunk = training_resize(np.left_shift(image, 8, dtype=np.uint16), width, height)
        return shrunk.astype(np.float32) * np.float32(1 / 256)
    return training_resize(image.astype(np.float32), width, height)


def _normalised_planes(resized: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(resized - mean) / std`` of an ``h×w×3`` float32 image as ``3×h×w`` planes: one channel at
    a time, which numpy does several times faster than broadcasting over the last axis of 3."""
    return np.stack([(plane - mean[c]) / std[c] for c, plane in enumerate(cv2.split(resized))])


def as_probability(prob: np.ndarray) -> np.ndarray:
    """Return ``prob`` as float32 in ``[0, 1]``; uint8 is divided by 255, floats are checked."""
    arr = np.asarray(prob)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"probability map must be float in [0, 1] or uint8, got dtype {arr.dtype}")
    out = arr.astype(np.float32)
    if out.size and (not np.isfinite(out).all() or out.min() < -1e-6 or out.max() > 1 + 1e-6):
        raise ValueError(
            f"probability map must lie in [0, 1], got range [{float(np.nanmin(out))}, {float(np.nanmax(out))}]"
        )
    return np.clip(out, 0.0, 1.0)


def squeeze_channel(arr: np.ndarray) -> np.ndarray:
    """Drop a trailing channel axis of size 1 (``H×W×1`` → ``H×W``)."""
    return arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr


def resize_to_original(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a probability map to ``size = (width, height)`` of the original image.

    ``prob`` is ``H×W`` (or ``H×W×1``), float in ``[0, 1]`` or ``uint8``. Returns a float32
    ``height×width`` array clipped to ``[0, 1]``. Raises ``ValueError`` for a non-positive size or
    a map that is not 2-D.
    """
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be a positive (width, height), got {size}")
    p = squeeze_channel(as_probability(prob))
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"probability map must be a non-empty 2-D array, got shape {p.shape}")
    if p.shape == (height, width):
        return p.copy()
    out = cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)
