"""A corpus of bad and awkward studio inputs, written into a batch to exercise cleaning.

Each *kind* is one way a real photo drop goes wrong (a missing mask, a truncated upload, a CMYK
JPEG from a retoucher, a phone photo with an EXIF rotation, ...). Some kinds must be rejected with
a reason code, others must be converted and kept; ``expected_reason`` says which (``""`` = kept).
The synthetic catalogue adds them with ``--bad K`` and the cleaning tests build the same corpus.
"""

from __future__ import annotations

import io
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tasks.core import storage
from tasks.core.png import png_chunk, png_header


@dataclass
class BadInput:
    """Files of one bad-input case: ``files`` maps a batch-relative path to its bytes."""

    kind: str
    stem: str
    expected_reason: str
    files: dict[str, bytes] = field(default_factory=dict)


def _product(rng: np.random.Generator, width: int = 240, height: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """Return a simple dark garment-like ellipse on a white background, and its exact mask."""
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = height * rng.uniform(0.45, 0.55), width * rng.uniform(0.45, 0.55)
    ry, rx = height * rng.uniform(0.25, 0.4), width * rng.uniform(0.2, 0.35)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    colour = rng.integers(20, 140, size=3)
    image = np.full((height, width, 3), 245, np.uint8)
    image[inside] = colour
    mask = np.where(inside, 255, 0).astype(np.uint8)
    return image, mask


def pillow_bytes(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    """``array`` saved by Pillow as ``fmt`` (after converting to ``mode`` when given)."""
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    return pillow_bytes(array, "JPEG", quality=92, **kwargs)


def _png(array: np.ndarray, **kwargs) -> bytes:
    return pillow_bytes(array, "PNG", **kwargs)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels but holds almost no data.

    This is what a decompression bomb looks like to a reader that trusts the header.
    """
    return png_header(width, height, 1) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + png_chunk(b"IEND", b"")


def _pair(stem: str, image: bytes, mask: bytes, image_ext: str = "jpg", mask_ext: str = "png") -> dict[str, bytes]:
    return {f"images/{stem}.{image_ext}": image, f"masks/{stem}.{mask_ext}": mask}


def _exif_rotated(image: np.ndarray, orientation: int) -> bytes:
    """JPEG bytes storing ``image`` rotated so that EXIF ``orientation`` turns it upright again."""
    stored = np.rot90(image, k=1) if orientation == 6 else image  # 6: viewer rotates 90° clockwise
    img = Image.fromarray(np.ascontiguousarray(stored))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def _case_missing_mask(stem, rng):
    image, _ = _product(rng)
    return {f"images/{stem}.jpg": _jpeg(image)}


def _case_missing_image(stem, rng):
    _, mask = _product(rng)
    return {f"masks/{stem}.png": _png(mask)}


def _case_zero_byte(stem, rng):
    _, mask = _product(rng)
    return _pair(stem, b"", _png(mask))


def _case_truncated(stem, rng):
    image, mask = _product(rng)
    data = _jpeg(image)
    return _pair(stem, data[: len(data) // 2], _png(mask))


def _case_undecodable(stem, rng):
    _, mask = _product(rng)
    return _pair(stem, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), _png(mask))


def _case_unsupported_format(stem, rng):
    image, mask = _product(rng)
    return _pair(stem, pillow_bytes(image, "GIF"), _png(mask), image_ext="gif")


def _case_disguised_format(stem, rng):
    image, mask = _product(rng)
    return _pair(stem, pillow_bytes(image, "BMP"), _png(mask))  # BMP bytes behind a .jpg name


def _case_cmyk(stem, rng):
    image, mask = _product(rng)
    return _pair(stem, _jpeg(image, mode="CMYK"), _png(mask))


def _case_16bit(stem, rng):
    image, mask = _product(rng)
    grey = (image.mean(axis=2).astype(np.uint16) * 257).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")  # mode I;16
    return _pair(stem, buf.getvalue(), _png(mask), image_ext="png")


def _case_grayscale(stem, rng):
    image, mask = _product(rng)
    return _pair(stem, _jpeg(image, mode="L"), _png(mask))


def _case_alpha(stem, rng):
    image, mask = _product(rng)
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0
    return _pair(stem, _png(rgba), _png(mask), image_ext="png")


def _case_exif_mask_upright(stem, rng):
    image, mask = _product(rng, width=200, height=300)
    return _pair(stem, _exif_rotated(image, 6), _png(mask))


def _case_exif_mask_stored(stem, rng):
    image, mask = _product(rng, width=200, height=300)
    return _pair(stem, _exif_rotated(image, 6), _png(np.ascontiguousarray(np.rot90(mask, k=1))))


def _case_size_mismatch(stem, rng):
    image, _ = _product(rng, width=240, height=320)
    _, mask = _product(rng, width=320, height=240)
    return _pair(stem, _jpeg(image), _png(mask))


def _case_mask_half_size(stem, rng):
    image, mask = _product(rng, width=240, height=320)
    small = np.asarray(Image.fromarray(mask).resize((120, 160), Image.NEAREST))
    return _pair(stem, _jpeg(image), _png(small))


def _case_mask_not_binary(stem, rng):
    image, _ = _product(rng)
    noise = rng.integers(0, 256, image.shape[:2], dtype=np.uint8)
    return _pair(stem, _jpeg(image), _png(noise))


def _case_mask_soft_edges(stem, rng):
    image, mask = _product(rng)
    soft = np.asarray(Image.fromarray(mask).resize((120, 160), Image.BOX).resize((240, 320), Image.BILINEAR))
    return _pair(stem, _jpeg(image), _png(soft))


def _case_mask_empty(stem, rng):
    image, mask = _product(rng)
    return _pair(stem, _jpeg(image), _png(np.zeros_like(mask)))


def _case_mask_full(stem, rng):
    image, mask = _product(rng)
    return _pair(stem, _jpeg(image), _png(np.full_like(mask, 255)))


def _case_too_large(stem, rng):
    _, mask = _product(rng)
    return _pair(stem, png_header_only(40_000, 40_000), _png(mask), image_ext="png")


def _case_too_small(stem, rng):
    image, mask = _product(rng, width=12, height=16)
    return _pair(stem, _jpeg(image), _png(mask))


def _case_odd_name(stem, rng):
    image, mask = _product(rng)
    odd = f"{stem} Sommerkleid (1) – blå"
    return _pair(odd, _jpeg(image), _png(mask))


def _case_unicode_forms(stem, rng):
    image, mask = _product(rng)
    name = f"{stem}-café"
    return {
        f"images/{unicodedata.normalize('NFC', name)}.JPG": _jpeg(image),
        f"masks/{unicodedata.normalize('NFD', name)}.png": _png(mask),
    }


def _case_duplicate_content(stem, rng):
    image, mask = _product(rng)
    img, msk = _jpeg(image), _png(mask)
    return {**_pair(f"{stem}-a", img, msk), **_pair(f"{stem}-b", img, msk)}


def _case_duplicate_stem(stem, rng):
    image, mask = _product(rng)
    return {
        f"images/{stem}.jpg": _jpeg(image),
        f"images/{stem}.png": _png(image),
        f"masks/{stem}.png": _png(mask),
    }


def _case_system_file(stem, rng):
    return {f"images/._{stem}.jpg": b"\x00\x05\x16\x07AppleDouble metadata"}


#: kind -> (expected quarantine reason, "" when the input must be converted and kept; builder)
BAD_KINDS: dict[str, tuple[str, Callable[[str, np.random.Generator], dict[str, bytes]]]] = {
    "missing_mask": ("missing_mask", _case_missing_mask),
    "missing_image": ("missing_image", _case_missing_image),
    "zero_byte": ("empty_file", _case_zero_byte),
    "truncated": ("truncated", _case_truncated),
    "undecodable": ("undecodable", _case_undecodable),
    "unsupported_format": ("unsupported_format", _case_unsupported_format),
    "disguised_format": ("unsupported_format", _case_disguised_format),
    "too_large": ("image_too_large", _case_too_large),
    "too_small": ("image_too_small", _case_too_small),
    "size_mismatch": ("size_mismatch", _case_size_mismatch),
    "mask_not_binary": ("mask_not_binary", _case_mask_not_binary),
    "mask_empty": ("mask_empty", _case_mask_empty),
    "mask_full": ("mask_full", _case_mask_full),
    "duplicate_content": ("duplicate", _case_duplicate_content),
    "duplicate_stem": ("duplicate_stem", _case_duplicate_stem),
    "system_file": ("system_file", _case_system_file),
    "cmyk": ("", _case_cmyk),
    "sixteen_bit": ("", _case_16bit),
    "grayscale": ("", _case_grayscale),
    "alpha": ("", _case_alpha),
    "exif_mask_upright": ("", _case_exif_mask_upright),
    "exif_mask_stored": ("", _case_exif_mask_stored),
    "mask_half_size": ("", _case_mask_half_size),
    "mask_soft_edges": ("", _case_mask_soft_edges),
    "odd_name": ("", _case_odd_name),
    "unicode_forms": ("", _case_unicode_forms),
}


def make_bad_inputs(count: int, seed: int = 0) -> list[BadInput]:
    """Build ``count`` bad-input cases, cycling through :data:`BAD_KINDS` in order.

    Returns one :class:`BadInput` per case, deterministic for a given ``seed``; stems are
    ``bad-<seed>-<index>-<kind>``.
    """
    kinds = list(BAD_KINDS)
    cases = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        reason, build = BAD_KINDS[kind]
        stem = f"bad-{seed}-{index:03d}-{kind}"
        rng = np.random.default_rng([seed, 7919, index])
        cases.append(BadInput(kind=kind, stem=stem, expected_reason=reason, files=build(stem, rng)))
    return cases


def write_bad_inputs(batch_url: str, count: int, seed: int, storage_options: dict | None = None) -> list[dict]:
    """Write ``count`` bad-input cases under ``batch_url`` (``images/``, ``masks/``).

    Returns one row per case: ``{"stem", "kind", "expected_reason"}``.
    """
    rows = []
    for case in make_bad_inputs(count, seed):
        for relpath, data in case.files.items():
            storage.write_bytes(storage.join(batch_url, relpath), data, storage_options)
        rows.append({"stem": case.stem, "kind": case.kind, "expected_reason": case.expected_reason})
    return rows
