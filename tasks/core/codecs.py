"""Image and mask codecs: the one place pixels are decoded from bytes and encoded to bytes.

Decoding: :func:`decode_image` (photo bytes → upright RGB, EXIF orientation applied, Pillow as a
fallback for formats OpenCV lacks), :func:`read_image` / :func:`read_mask` (a URL → RGB / grey,
OpenCV only, no orientation: labelled pairs are stored upright), :func:`decode_pair` (a clean
pair's bytes → RGB image and grey mask), :func:`image_size` (width and height from the header, no
pixel decoded) and :func:`decode_mask_file` (an uploaded mask → 0/255, its format and size checked
from the header before any pixel is decoded). Encoding: :func:`encode_jpeg` (RGB → JPEG at a
quality), :func:`encode_png` (a single-channel mask → 8-bit grayscale PNG) and :func:`encode`
(an OpenCV ``imencode`` with explicit params, ``ValueError`` when it fails); the cut-outs' own
PNG writer is :mod:`tasks.core.png`. Shared pixel steps:
:func:`on_white` (transparency laid on white), :func:`area_average` and :func:`shrink_mask` (the
shrink cleaning applies to a pair, and the masks page to a mask drawn on the full-size photo).
"""

from __future__ import annotations

import io
import threading
import warnings

import cv2
import numpy as np

from tasks.core import storage
from tasks.core.limits import ASPECT_TOLERANCE, MAX_PIXELS, aspect_mismatch

__all__ = [
    "MASK_EXTENSIONS",
    "area_average",
    "decode_image",
    "decode_mask_file",
    "decode_pair",
    "encode",
    "encode_jpeg",
    "encode_png",
    "ImageTooLarge",
    "image_size",
    "on_white",
    "read_image",
    "read_mask",
    "shrink_mask",
]


#: File extensions of a mask file, in cleaning and in evaluation: lossless PNG only (a JPEG's blocks blur
#: the edges that training learns and the IoU measures).
MASK_EXTENSIONS: tuple[str, ...] = (".png",)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

#: OpenCV builds with ``IMREAD_COLOR_RGB`` decode straight to RGB (no BGR copy to convert); older ones to BGR.
_DECODES_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")
_DECODE_FLAGS = (cv2.IMREAD_COLOR_RGB if _DECODES_RGB else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION

_ORIENT = {  # EXIF orientation → numpy op giving the upright image (as PIL.ImageOps.exif_transpose)
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _orientation(image) -> int:
    """The EXIF orientation (1 when absent or unreadable: a corrupt EXIF block is ignored, not fatal)."""
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # Pillow raises several types for malformed EXIF
        return 1


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than allowed (a cap, or Pillow's decompression-bomb
    limit): refused before any pixel is decoded."""


#: Pillow modes that carry an alpha channel (a palette or grey image may carry transparency too).
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def on_white(image):
    """A Pillow image with transparency composited on white, as an RGB Pillow image."""
    from PIL import Image

    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def area_average(image, size: tuple[int, int]) -> np.ndarray:
    """Shrink a uint8 Pillow image (L or RGB) to ``size`` by area averaging: Pillow's box filter, which
    weighs the partly covered source pixels as OpenCV's ``INTER_AREA`` does, in about half its time
    at the fractional scales cleaning meets. A shrink by two or more first averages whole blocks of
    pixels (``reducing_gap=1``), which moves about one pixel in a thousand of a re-thresholded mask."""
    from PIL import Image

    return np.asarray(image.resize(size, Image.Resampling.BOX, reducing_gap=1.0))


def shrink_mask(binary: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Shrink a uint8 {0, 255} mask to ``size`` (at most its own) by coverage (the area average of
    0/255) and re-threshold at one half; returns uint8 {0, 255} (the mask itself at its own size)."""
    from PIL import Image

    if size == (binary.shape[1], binary.shape[0]):
        return binary
    coverage = area_average(Image.fromarray(binary), size)
    return cv2.threshold(coverage, 127, 255, cv2.THRESH_BINARY)[1]


def bomb_warning_action(max_pixels: int | None) -> str:
    """What to do with Pillow's ``DecompressionBombWarning`` (a header over ``Image.MAX_IMAGE_PIXELS``,
    89.5 MP) under our own limit ``max_pixels``: ``"ignore"`` when that limit is higher (it is checked
    from the same header next, so a 100 MP studio frame passes when allowed), else ``"error"``. Over
    twice Pillow's limit (179 MP) Pillow refuses to open the file whatever the limit."""
    from PIL import Image

    return "ignore" if max_pixels is not None and max_pixels > Image.MAX_IMAGE_PIXELS else "error"


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to an upright ``H×W×3`` RGB ``uint8`` array.

    The EXIF orientation is read with Pillow and applied as ``PIL.ImageOps.exif_transpose``
    would; pixels are decoded by OpenCV (faster), or by Pillow for formats OpenCV cannot read.
    An image with transparency (an earlier cut-out, say) is laid on white, as the studio shoots
    and cleaning does: the colours under its transparent pixels are not shown to the model or the
    output. Raises ``ValueError`` with a reason for empty or undecodable data, and, before any
    pixel is decoded, :class:`ImageTooLarge` for an image whose header claims more than
    ``max_pixels`` pixels.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            if bomb_warning_action(max_pixels) == "ignore":
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"image too large: {im.width}x{im.height} is {im.width * im.height / 1e6:.1f} "
                                 f"megapixels, over the limit of {max_pixels / 1e6:g}")
            orientation = _orientation(im)
            if im.mode in _ALPHA_MODES or "transparency" in im.info:
                return np.asarray(on_white(ImageOps.exif_transpose(im)))
            image = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS)
            if image is None:  # a format OpenCV lacks: let Pillow decode it
                return np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from None
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"cannot decode image (shape {image.shape})")
    rgb = image if _DECODES_RGB else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if orientation in _ORIENT:
        rgb = np.ascontiguousarray(_ORIENT[orientation](rgb))
    return rgb


def read_image(url: str, storage_options: dict | None) -> np.ndarray:
    """Read and decode an image file into ``H×W×3`` RGB ``uint8``; ``ValueError`` when empty or undecodable."""
    data = np.frombuffer(storage.read_bytes(url, storage_options), np.uint8)
    if not data.size:
        raise ValueError(f"image {url} is an empty file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image {url}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(url: str, storage_options: dict | None) -> np.ndarray:
    """Read and decode a mask file into ``H×W`` ``uint8``; ``ValueError`` when empty or undecodable."""
    data = np.frombuffer(storage.read_bytes(url, storage_options), np.uint8)
    if not data.size:
        raise ValueError(f"mask {url} is an empty file")
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


def image_size(data: bytes, formats: tuple[str, ...] | None = None) -> tuple[int, int]:
    """``(width, height)`` read from the file's header: no pixel is decoded, so a small file that
    claims a huge image costs nothing. ``formats`` limits the accepted formats (Pillow's names,
    e.g. ``("PNG",)``). Raises :class:`ImageTooLarge` beyond Pillow's decompression-bomb limit
    (``2 × PIL.Image.MAX_IMAGE_PIXELS``) and ``ValueError`` for empty data or anything else that
    is not such an image."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    what = "/".join(formats) if formats else "an image"
    if not data:
        raise ValueError(f"the file is empty (0 bytes), not {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(formats) if formats else None) as image:
                return image.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError(f"the file is not {what}") from None


def decode_mask_file(data: bytes, size: tuple[int, int], max_bytes: int, reference: str = "the photo",
                     shrink_to_fit: bool = False) -> np.ndarray:
    """Decode an uploaded mask PNG to an ``H×W`` ``uint8`` array of 0/255, checking first, from the
    header, that it is at most ``max_bytes``, a PNG and exactly ``size`` (``(width, height)``), or,
    with ``shrink_to_fit``, larger with the same aspect ratio (within ``ASPECT_TOLERANCE``; a mask
    drawn on the full-size photo of a pair cleaning shrank): it is then shrunk by coverage (area
    averaging) to ``size``.

    Greyscale, RGB (its grey value) and 16-bit (the top byte) masks are accepted; a not fully
    opaque alpha channel is the mask (a cut-out). Pixels at or above half intensity become 255.
    Raises ``ValueError`` saying what is wrong (``reference`` names what the mask belongs to);
    nothing is decoded for a file of the wrong size.
    """
    if len(data) > max_bytes:
        raise ValueError(f"the mask file is larger than {max_bytes / 2**20:g} MiB")
    try:
        width, height = image_size(data, ("PNG",))
    except ImageTooLarge:
        raise ValueError(f"the mask is far larger than {reference} ({size[0]}x{size[1]} pixels)") from None
    except ValueError:
        raise ValueError("the mask file is not a PNG image") from None
    shrink = shrink_to_fit and (width, height) != tuple(size) and _larger_same_aspect((width, height), size)
    if shrink and width * height > MAX_PIXELS:
        raise ValueError(f"the mask is {width}x{height} pixels, over the {MAX_PIXELS / 1e6:g} megapixels a photo may have")
    if (width, height) != tuple(size) and not shrink:
        larger = " or larger with the same aspect ratio" if shrink_to_fit else ""
        raise ValueError(f"the mask is {width}x{height} pixels but {reference} is {size[0]}x{size[1]}: "
                         f"they must be the same size{larger}")
    return shrink_mask(_binary_mask(data), tuple(size))


def _larger_same_aspect(found: tuple[int, int], size: tuple[int, int]) -> bool:
    """True when ``found`` is larger than ``size`` and has its aspect ratio within :data:`ASPECT_TOLERANCE`."""
    return found[0] >= size[0] and found[1] >= size[1] and aspect_mismatch(found, size) <= ASPECT_TOLERANCE


#: Uploaded masks decoded at once in one process: a small PNG can hold a 50 MP mask, so each decode may
#: take a few hundred MB; more uploads wait their turn instead of running the server out of memory.
_MASK_DECODES = threading.BoundedSemaphore(2)


def _binary_mask(data: bytes) -> np.ndarray:
    """A mask PNG's pixels as 0/255: its alpha when not fully opaque, else its grey value (16-bit: the
    top byte), at or above half intensity. Works in the file's own 8 or 16 bits (no wider copy)."""
    from PIL import Image

    with _MASK_DECODES:
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                image.load()
                if image.mode in ("LA", "RGBA", "PA") or "transparency" in image.info:
                    alpha = np.asarray(image.getchannel("A") if image.mode in ("LA", "RGBA")
                                       else image.convert("RGBA").getchannel("A"))
                    if alpha.min() < 255:
                        return (alpha >= 128).astype(np.uint8) * np.uint8(255)
                if image.mode.startswith("I"):
                    return (np.asarray(image) >= 128 << 8).astype(np.uint8) * np.uint8(255)  # top byte >= 128
                grey = np.asarray(image.convert("L"))
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"the PNG does not decode: {exc}") from None
    return (grey >= 128).astype(np.uint8) * np.uint8(255)


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
