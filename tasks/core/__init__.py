"""Bottom layer: storage URLs and atomic writes, the dataset manifest, image/mask codecs."""
