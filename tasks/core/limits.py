"""Size limits every stage shares, so that cleaning, production and the pages refuse the same
photos for the same reason."""

#: The most pixels a photo may have (50 megapixels: an 8,660 × 5,774 studio frame). Checked from the
#: file's header before any pixel is decoded; decoding one costs 150 MB as RGB, several times that
#: through preprocessing, so this bounds a task's memory per image in flight.
MAX_PIXELS = 50_000_000

#: How far a mask's aspect ratio may be from its photo's (relative) and still be that photo's mask: a
#: mask exported at another size rounds its sides. Cleaning, the correction page and publishing share it.
ASPECT_TOLERANCE = 0.01


def aspect_mismatch(found: tuple[int, int], size: tuple[int, int]) -> float:
    """How far the aspect ratio of ``found`` (width, height) is from that of ``size``, relative to the latter."""
    (width, height), (want_w, want_h) = found, size
    return abs(width / height - want_w / want_h) / (want_w / want_h)
