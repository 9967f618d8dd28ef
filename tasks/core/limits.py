"""Size limits every stage shares, so that cleaning, production and the pages refuse the same
photos for the same reason."""

#: The most pixels a photo may have (50 megapixels: an 8,660 × 5,774 studio frame). Checked from the
#: file's header before any pixel is decoded; decoding one costs 150 MB as RGB, several times that
#: through preprocessing, so this bounds a task's memory per image in flight.
MAX_PIXELS = 50_000_000
