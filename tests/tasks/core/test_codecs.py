"""Decoding photos: a raised pixel limit lets a frame over Pillow's warning level through."""

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
