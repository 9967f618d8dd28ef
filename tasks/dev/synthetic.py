"""A small dataset version drawn from the synthetic catalogue, laid out as the cleaning stage
writes one (``manifest.parquet`` + ``clean/images`` + ``clean/masks``), for tests, demos and
benchmarks of the training code without running the ingest pipeline first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tasks.core import layout, storage
from tasks.core.manifest import MANIFEST_COLUMNS, STATUS_OK, to_frame, write_table
from tasks.core.codecs import encode_jpeg, encode_png
from tasks.dev.synth import SynthConfig, render_item

__all__ = ["write_synthetic_dataset"]


def write_synthetic_dataset(dataset_url: str, n: int, seed: int = 0, max_side: int = 320,
                            split_for: Callable[[int], str | None] | None = None,
                            cluster_for: Callable[[int, str], str | None] | None = None,
                            quarantined: Sequence[int] = (),
                            storage_options: dict | None = None) -> list[dict]:
    """Render ``n`` products and write them as a dataset version at ``dataset_url``.

    Args:
        dataset_url: the version folder (local or ``s3://``); ``manifest.parquet`` goes there.
        n, seed, max_side: which products and how large (longer side, aspect kept).
        split_for: ``index → split`` (``"train"``/``"val"``/``"test"`` or None); default all train.
        cluster_for: ``(index, product type) → cluster`` (None allowed); default the product type.
        quarantined: indices written with ``status = "quarantined"`` (their files still exist).
        storage_options: fsspec options for ``dataset_url``.

    Returns the manifest rows (dicts with ``MANIFEST_COLUMNS`` keys).
    """
    config = SynthConfig(n=n, seed=seed, max_side=max_side)
    rows = []
    for index in range(n):
        item = render_item(index, config)
        image_url = storage.join(layout.clean(dataset_url), "images", f"{item.stem}.jpg")
        mask_url = storage.join(layout.clean(dataset_url), "masks", f"{item.stem}.png")
        storage.write_bytes(image_url, encode_jpeg(item.image), storage_options)
        storage.write_bytes(mask_url, encode_png(item.mask), storage_options)
        height, width = item.mask.shape
        rows.append({
            "stem": item.stem, "key": item.stem, "batch": f"synthetic-{seed}", "width": width, "height": height,
            "fg_fraction": float((item.mask > 127).mean()), "image_url": image_url, "mask_url": mask_url,
            "status": "quarantined" if index in quarantined else STATUS_OK,
            "reason": "duplicate" if index in quarantined else None,
            "cluster": cluster_for(index, item.product_type) if cluster_for else item.product_type,
            "split": split_for(index) if split_for else "train",
        })
    write_table(to_frame(rows, MANIFEST_COLUMNS), layout.manifest(dataset_url), storage_options)
    return rows
