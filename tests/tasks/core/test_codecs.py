"""Decoding photos and masks: a raised pixel limit lets a frame over Pillow's warning level through; an
uploaded 16-bit mask is read without wide copies."""

import warnings

import pytest

from tasks.core.codecs import ImageTooLarge, bomb_warning_action, decode_image
from tasks.dev.badinputs import png_header_only


def test_a_raised_limit_is_ours_to_check_not_pillows_warning():
    assert bomb_warning_action(None) == bomb_warning_action(50_000_000) == "error"
    assert bomb_warning_action(100_000_000) == "ignore"
    big = png_header_only(12_000, 8_000)  # 96 MP, over Pillow's 89.5 MP warning level
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="cannot decode image"):  # past the size checks: its data is missing
            decode_image(big, max_pixels=100_000_000)
        with pytest.raises(ImageTooLarge, match="over the limit of 95"):
            decode_image(big, max_pixels=95_000_000)


def test_a_sixteen_bit_mask_is_read_by_its_top_byte_in_its_own_bits():
    """A 16-bit upload is thresholded at half intensity (top byte >= 128) without a wider copy: a 7,000²
    mask (107 KB of PNG, under the 50 MP cap) peaks under 500 MiB where int64 copies took 947 MiB."""
    import io
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from tasks.core.codecs import decode_mask_file

    small = np.array([[0, 32767, 32768, 65535]], np.uint16).repeat(4, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(small).save(buffer, "PNG")
    assert decode_mask_file(buffer.getvalue(), (4, 4), 2**20).tolist()[0] == [0, 0, 255, 255]
    measure = (
        "import io, resource, numpy as np\n"
        "from PIL import Image\n"
        "from tasks.core.codecs import decode_mask_file\n"
        "a = np.zeros((7000, 7000), np.uint16); a[1000:6000, 1000:6000] = 65535\n"
        "b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); data = b.getvalue(); del a\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = decode_mask_file(data, (700, 700), 2**20, shrink_to_fit=True)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, m.shape, int(m.max()))\n")
    grown = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True, check=True).stdout
    assert float(grown.split()[0]) < 500 and "(700, 700) 255" in grown, grown


@pytest.mark.parametrize("fmt, mode, options", [
    ("PNG", "RGB", {}), ("PNG", "L", {}), ("PNG", "P", {}), ("PNG", "I;16", {}), ("WEBP", "RGB", {"lossless": True}),
    ("TIFF", "RGB", {}), ("TIFF", "CMYK", {}), ("BMP", "RGB", {}), ("GIF", "P", {}), ("PPM", "RGB", {}),
])
def test_every_format_decodes_to_rgb_in_pillows_channel_order(fmt, mode, options):
    """OpenCV decodes straight to RGB where it can: each lossless format and mode gives Pillow's pixels."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    rgb = np.zeros((23, 31, 3), np.uint8)
    rgb[..., 0], rgb[:, :15, 1], rgb[10:, :, 2] = 250, 120, 30  # three channels that differ everywhere
    rgb[::4] = rng.integers(0, 256, (6, 31, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    image = image.convert(mode) if mode != "I;16" else Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    if mode == "I;16":  # Pillow clips 16-bit values to 8 bits where OpenCV keeps the top byte
        expected = np.repeat(rgb[..., :1], 3, axis=2)
    decoded = decode_image(buffer.getvalue())
    assert decoded.dtype == np.uint8 and decoded.shape == rgb.shape
    np.testing.assert_array_equal(decoded, expected)
