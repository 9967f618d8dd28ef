"""Data stages: cleaning, features, clustering, review, splits, augmentation, mask audit."""
