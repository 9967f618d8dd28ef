"""The cut-outs' PNG encoder: every row filtered "up", the rows deflated by ISA-L where installed.

OpenCV's encoder (libpng on zlib) spends nearly all of a cut-out's PNG time in zlib's deflate. The
``isal`` package (Intel's ISA-L "igzip", a core dependency) writes the same zlib stream format at
its levels 1-3 about four times as fast, as small as zlib's level 1 on cut-outs
(``benchmarks/inference_profile.py``). The file is an ordinary 8-bit PNG: IHDR, IDAT chunks, IEND.
Where ``isal`` cannot be imported (a platform without its wheel) the standard library's zlib
deflates, as fast as OpenCV did.
"""

from __future__ import annotations

import operator
import struct
import zlib

import numpy as np

try:
    from isal import isal_zlib
except ImportError:
    isal_zlib = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA
_FILTER_UP = 2
#: zlib levels ISA-L deflates (its own levels 1-3); 0 (stored) and 4-9 go to zlib.
ISAL_LEVELS = range(1, 4)


#: Raw bytes filtered and deflated at a time: the writer's working memory beside its output.
BAND_BYTES = 1 << 20
#: The largest IDAT chunk written (PNG allows 2**31 - 1 bytes).
IDAT_BYTES = 1 << 24


def _compressor(level: int):
    """A streaming zlib compressor at zlib ``level`` 0-9: ISA-L for levels 1-3 where ``isal`` is
    installed, the standard zlib otherwise."""
    if isal_zlib is not None and level in ISAL_LEVELS:
        return isal_zlib.compressobj(level)
    return zlib.compressobj(level)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: the data's length, the four-letter ``kind``, the data, their CRC-32."""
    return b"".join((struct.pack(">I", len(data)), kind, data,
                     struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))))


def png_header(width: int, height: int, channels: int) -> bytes:
    """The signature and IHDR chunk of an 8-bit PNG of ``channels`` 1 (grey), 3 (RGB) or 4 (RGBA),
    with no interlacing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE[channels], 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr)


def png_bytes(pixels: np.ndarray, level: int = 1) -> bytes:
    """An 8-bit PNG of ``uint8`` pixels: ``H×W`` grey, or ``H×W×3`` RGB / ``H×W×4`` RGBA in that
    channel order (not OpenCV's BGR), deflated at zlib ``level`` 0-9 (ISA-L for 1-3 where
    installed); ``ValueError`` for any other array or level, ``TypeError`` for a level that is not
    an integer.

    Rows are filtered and deflated in bands of about :data:`BAND_BYTES`, so the working memory stays
    small beside the photo; the stream is cut into IDAT chunks of at most :data:`IDAT_BYTES`.
    """
    level = operator.index(level)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or 0 in pixels.shape:
        raise ValueError(f"png_bytes needs a non-empty uint8 H×W or H×W×C image, got {pixels.dtype} {pixels.shape}")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels not in _COLOUR_TYPE:
        raise ValueError(f"png_bytes writes 1, 3 or 4 channels, got {channels}")
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must lie in 0..9, got {level}")
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, width * channels)  # a copy only when a strided view cannot be reshaped
    parts = [png_header(width, height, channels)]
    compressor = _compressor(level)
    band = max(1, BAND_BYTES // (width * channels + 1))
    filtered = np.empty((min(band, height), width * channels + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    for top in range(0, height, band):
        bottom = min(height, top + band)
        out = filtered[: bottom - top]
        above = rows[top - 1] if top else np.zeros(width * channels, np.uint8)  # row 0's "up" neighbour is zero
        np.subtract(rows[top], above, out=out[0, 1:])
        np.subtract(rows[top + 1:bottom], rows[top:bottom - 1], out=out[1:, 1:])  # modulo 256, as defined
        parts += _idat_chunks(compressor.compress(out))
    parts += _idat_chunks(compressor.flush())
    parts.append(png_chunk(b"IEND", b""))
    return b"".join(parts)


def _idat_chunks(data: bytes) -> list[bytes]:
    view = memoryview(data)
    return [png_chunk(b"IDAT", view[start:start + IDAT_BYTES]) for start in range(0, len(data), IDAT_BYTES)]
