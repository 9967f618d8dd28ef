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
