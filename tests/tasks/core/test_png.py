"""The cut-outs' PNG writer: what it writes reads back pixel for pixel in Pillow and OpenCV, at every
level, with ISA-L and with the standard zlib it falls back to; anything else is refused."""

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.core import png
from tasks.core.png import png_bytes


def _photo_like(height: int, width: int, channels: int) -> np.ndarray:
    """Smooth gradients with noise and a hard-edged transparent region, like a cut-out."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width]
    base = ((x * 3 + y * 2) % 256)[..., None] + rng.integers(-9, 10, (height, width, channels))
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    pixels[: height // 3, : width // 2] = 0
    return pixels[..., 0] if channels == 1 else pixels


def _read_both(data: bytes, pixels: np.ndarray) -> None:
    """``data`` read by Pillow and by OpenCV (libpng checks every chunk's CRC) is ``pixels``."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        assert image.size == (pixels.shape[1], pixels.shape[0])
        assert np.array_equal(np.asarray(image), pixels)
    read = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = pixels if channels == 1 else pixels[..., [2, 1, 0, 3][:channels]]  # OpenCV reads BGR(A)
    assert read is not None and np.array_equal(read, expected)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("level", range(10))
def test_what_it_writes_reads_back_exactly(channels, level):
    pixels = _photo_like(37, 53, channels)
    _read_both(png_bytes(pixels, level), pixels)


@pytest.mark.parametrize("height,width", [(1, 1), (1, 40), (40, 1)])
def test_a_single_row_or_column(height, width):
    pixels = _photo_like(40, 40, 4)[:height, :width]
    _read_both(png_bytes(pixels, 1), pixels)


def test_bands_and_chunks_of_any_size_read_back(monkeypatch):
    monkeypatch.setattr(png, "BAND_BYTES", 1000)  # 4 rows of 201 bytes a band
    monkeypatch.setattr(png, "IDAT_BYTES", 512)
    pixels = _photo_like(37, 50, 4)
    data = png_bytes(pixels, 1)
    sizes, at = [], 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        sizes += [length] if kind == b"IDAT" else []
        at += 12 + length
    assert len(sizes) > 2 and max(sizes) == 512
    _read_both(data, pixels)


def test_levels_one_to_three_go_to_isal_and_the_others_to_zlib(monkeypatch):
    assert png.isal_zlib is not None, "isal is a core dependency"
    compressors = {level: type(png._compressor(level)).__module__ for level in range(10)}
    assert all(("isal" in module) == (level in (1, 2, 3)) for level, module in compressors.items())
    pixels = _photo_like(20, 30, 4)
    monkeypatch.setattr(png, "isal_zlib", None)  # a platform without the wheel
    assert "isal" not in type(png._compressor(1)).__module__
    _read_both(png_bytes(pixels, 1), pixels)


def test_a_strided_view_is_written_as_its_pixels():
    pixels = _photo_like(40, 60, 4)[::2, 1::3]
    _read_both(png_bytes(pixels, 1), pixels)


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
