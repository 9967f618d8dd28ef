from tasks.core.limits import ASPECT_TOLERANCE, aspect_mismatch
from tasks.data.config import CleaningConfig


def test_aspect_mismatch_is_relative_to_the_photo_and_one_tolerance_serves_every_stage():
    assert aspect_mismatch((600, 800), (300, 400)) == 0.0
    assert aspect_mismatch((606, 800), (600, 800)) == abs(606 / 800 - 0.75) / 0.75
    assert aspect_mismatch((301, 400), (300, 400)) <= ASPECT_TOLERANCE < aspect_mismatch((310, 400), (300, 400))
    assert CleaningConfig().max_aspect_mismatch == ASPECT_TOLERANCE
