"""Bottom layer: storage URLs and atomic writes, the dataset manifest, image/mask codecs, and the
heap setting PyTorch's CPU passes use."""
