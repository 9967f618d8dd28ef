"""The cut-outs' PNG writer: what it writes reads back pixel for pixel in Pillow and OpenCV, at every
level, with ISA-L and with the standard zlib it falls back to; anything else is refused."""

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.core import png
from tasks.core.png import deflate, png_bytes


def _photo_like(height: int, width: int, channels: int) -> np.ndarray:
    """Smooth gradients with noise and a hard-edged transparent region, like a cut-out."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width]
    base = ((x * 3 + y * 2) % 256)[..., None] + rng.integers(-9, 10, (height, width, channels))
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    pixels[: height // 3, : width // 2] = 0
    return pixels[..., 0] if channels == 1 else pixels


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
@pytest.mark.parametrize("level", [0, 1, 2, 3, 6, 9])
def test_what_it_writes_reads_back_exactly(channels, mode, level):
    pixels = _photo_like(37, 53, channels)
    data = png_bytes(pixels, level)
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # checks each chunk's CRC and the zlib stream's Adler-32
        assert image.mode == mode and image.size == (53, 37)
        assert np.array_equal(np.asarray(image), pixels)
    read = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = pixels if channels == 1 else pixels[..., [2, 1, 0, 3][:channels]]  # OpenCV reads BGR(A)
    assert np.array_equal(read, expected)


def test_levels_one_to_three_go_to_isal_and_the_others_to_zlib(monkeypatch):
    data = _photo_like(64, 64, 4).tobytes()
    assert png.isal_zlib is not None, "isal is a core dependency"
    for level in range(10):
        assert zlib.decompress(deflate(data, level)) == data
        expected = png.isal_zlib.compress(data, level) if level in (1, 2, 3) else zlib.compress(data, level)
        assert deflate(data, level) == expected
    monkeypatch.setattr(png, "isal_zlib", None)  # a platform without the wheel
    assert deflate(data, 1) == zlib.compress(data, 1)
    pixels = _photo_like(20, 30, 4)
    with Image.open(io.BytesIO(png_bytes(pixels, 1))) as image:
        assert np.array_equal(np.asarray(image), pixels)


def test_a_strided_view_is_written_as_its_pixels():
    pixels = _photo_like(40, 60, 4)[::2, 1::3]
    with Image.open(io.BytesIO(png_bytes(pixels, 1))) as image:
        assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("shape,dtype,level,message", [
    ((4, 4), np.uint16, 1, "uint8"),
    ((0, 4), np.uint8, 1, "non-empty"),
    ((4, 4, 2), np.uint8, 1, "1, 3 or 4 channels"),
    ((4,), np.uint8, 1, "H×W"),
    ((4, 4), np.uint8, 10, "0..9"),
])
def test_anything_else_is_refused(shape, dtype, level, message):
    with pytest.raises(ValueError, match=message):
        png_bytes(np.zeros(shape, dtype), level)
