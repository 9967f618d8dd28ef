"""Image and mask codecs: the one place pixels are decoded from bytes and encoded to bytes.

Decoding: :func:`decode_image` (photo bytes → upright RGB, EXIF orientation applied, Pillow as a
fallback for formats OpenCV lacks), :func:`read_image` / :func:`read_mask` (a URL → RGB / grey,
OpenCV only, no orientation: labelled pairs are stored upright), :func:`decode_pair` (a clean
pair's bytes → RGB image and grey mask). Encoding: :func:`encode_jpeg` (RGB → JPEG at a
quality), :func:`encode_png` (a single-channel mask → 8-bit grayscale PNG) and :func:`encode`
(an OpenCV ``imencode`` with explicit params, ``ValueError`` when it fails).
"""

from __future__ import annotations

import io

import cv2
import numpy as np

from tasks.core import storage

__all__ = [
    "decode_image",
    "decode_pair",
    "encode",
    "encode_jpeg",
    "encode_png",
    "read_image",
    "read_mask",
]


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

_ORIENT = {  # EXIF orientation → numpy op giving the upright image (as PIL.ImageOps.exif_transpose)
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to an upright ``H×W×3`` RGB ``uint8`` array.

    The EXIF orientation is read with Pillow and applied as ``PIL.ImageOps.exif_transpose``
    would; pixels are decoded by OpenCV (faster), or by Pillow for formats OpenCV cannot read.
    Raises ``ValueError`` with a reason for empty or undecodable data.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if image is None:  # a format OpenCV lacks: let Pillow decode it
                return np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from None
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"cannot decode image (shape {image.shape})")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if orientation in _ORIENT:
        rgb = np.ascontiguousarray(_ORIENT[orientation](rgb))
    return rgb


def read_image(url: str, storage_options: dict | None) -> np.ndarray:
    """Read and decode an image file into ``H×W×3`` RGB ``uint8``; ``ValueError`` when undecodable."""
    data = np.frombuffer(storage.read_bytes(url, storage_options), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image {url}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(url: str, storage_options: dict | None) -> np.ndarray:
    """Read and decode a mask file into ``H×W`` ``uint8``; ``ValueError`` when undecodable."""
    data = np.frombuffer(storage.read_bytes(url, storage_options), np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot decode mask {url}")
    return mask


def decode_pair(image_bytes: bytes, mask_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode clean-pair bytes to ``(RGB uint8 image, uint8 mask)``; ``ValueError`` if either fails."""
    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    mask = cv2.imdecode(np.frombuffer(mask_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or mask is None:
        raise ValueError(f"{'image' if image is None else 'mask'} could not be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), mask


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------

def encode(ext: str, image: np.ndarray, params: list[int]) -> bytes:
    """``cv2.imencode(ext, image, params)`` as bytes; ``ValueError`` when encoding fails."""
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise ValueError(f"{ext} encoding failed")
    return buf.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """Encode an RGB uint8 image as JPEG bytes at ``quality``."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(mask: np.ndarray) -> bytes:
    """Encode a single-channel ``uint8`` mask (HxW, e.g. 0/255) as an 8-bit grayscale PNG (read
    back as mode ``L``); ``ValueError`` when encoding fails."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
