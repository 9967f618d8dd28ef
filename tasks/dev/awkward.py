"""A production drop of awkward photos: what a studio's exports and uploads produce on a bad day.

Decompression bombs (a PNG whose header claims 144 megapixels over almost no data, and a real one:
256 megapixels of greyscale, every row present, about 260 KB), empty and text files named ``.jpg``, a
truncated JPEG, CMYK, 16-bit, alpha, WebP, a corrupt and a rotating EXIF block, a 40×30,000 sliver,
a 20×24 thumbnail and one plain good photo. The fault tests drop them through ``process_shard`` and through the
``bgremoval_inference`` DAG: the convertible ones must come out, the others land in ``failed/``
with a reason, and the shard must complete.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from tasks.core.codecs import encode_jpeg
from tasks.core.png import png_chunk, png_header
from tasks.dev.badinputs import pillow_bytes, png_header_only
from tasks.dev.synth import SynthConfig, render_item

#: The stems :func:`awkward_drop` writes that a production run must refuse (``failed/``), and those it
#: must cut out (published or queued). ``truncated`` and ``sliver`` may go either way.
REFUSED = ("bomb256", "bomb", "zero", "text", "thumbnail")
CONVERTIBLE = ("good", "cmyk", "sixteen", "alpha", "photo", "bad-exif", "rotated")


def png_bomb(side: int) -> bytes:
    """A greyscale ``side``×``side`` PNG of zeros with every row present: a few hundred KB that
    decode to ``side``² bytes (a decompression bomb that is a valid image)."""
    stream, rows = zlib.compressobj(9), b"\0" * (side + 1) * 256  # each row: filter byte + pixels
    idat = b"".join(stream.compress(rows) for _ in range(side // 256)) + stream.compress(b"\0" * (side + 1) * (side % 256))
    return png_header(side, side, 1) + png_chunk(b"IDAT", idat + stream.flush()) + png_chunk(b"IEND", b"")


def awkward_drop() -> dict[str, bytes]:
    """File name -> bytes of the awkward drop (see the module docstring)."""
    product = render_item(0, SynthConfig(n=1, seed=9, max_side=200)).image
    grey16 = np.asarray(Image.fromarray(product).convert("L")).astype(np.uint16) * 257
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode_jpeg(product)
    return {
        "bomb256.png": png_bomb(16_384),
        "bomb.png": png_header_only(12_000, 12_000),  # 144 megapixels: under Pillow's own limit, over the project's
        "zero.jpg": b"",
        "text.jpg": b"this is a caption, not a photo\n" * 10,
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "cmyk.jpg": pillow_bytes(product, "JPEG", mode="CMYK"),
        "sixteen.png": pillow_bytes(grey16, "PNG"),
        "alpha.png": pillow_bytes(product, "PNG", mode="RGBA"),
        "photo.webp": pillow_bytes(product, "WEBP"),
        "bad-exif.jpg": jpeg[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*\xff\xff\xff\xff" + jpeg[2:],
        "rotated.jpg": pillow_bytes(product, "JPEG", exif=exif),
        "sliver.png": pillow_bytes(np.full((30_000, 40, 3), (200, 30, 30), np.uint8), "PNG"),
        "thumbnail.jpg": pillow_bytes(np.asarray(Image.fromarray(product).resize((20, 24))), "JPEG"),
        "good.jpg": jpeg,
    }
