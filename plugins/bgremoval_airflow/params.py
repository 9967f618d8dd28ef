"""DAG ``Param`` definitions shared by the bgremoval DAGs, and their conversion to config dataclasses."""

from __future__ import annotations

from airflow.sdk import Param

DEFAULT_BUCKET = "bgremoval"


def batch_params() -> dict[str, Param]:
    """Params that say which studio batch to process and where it lies."""
    return {
        "batch": Param(
            "demo",
            type="string",
            minLength=1,
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            title="Studio batch",
            description="Name of the folder under raw/ that the studio uploaded, e.g. 2026-11-27-shoot-a. "
            "The run waits until raw/<batch>/_READY exists.",
        ),
        "bucket": Param(
            DEFAULT_BUCKET,
            type="string",
            minLength=3,
            title="S3 bucket",
            description="Bucket holding raw/, datasets/ and the rest of the storage layout.",
        ),
    }


def cleaning_params() -> dict[str, Param]:
    """Params of the cleaning stage (see ``tasks.cleaning.CleaningConfig``)."""
    return {
        "working_size": Param(
            320,
            type="integer",
            minimum=32,
            maximum=2048,
            title="Working resolution (px)",
            description="Clean pairs are resized so that their longer side has this many pixels; aspect is kept.",
        ),
        "shard_size": Param(
            250,
            type="integer",
            minimum=1,
            title="Pairs per shard",
            description="The batch is split into shards of this many pairs, cleaned in parallel by mapped tasks.",
        ),
        "max_ambiguous_fraction": Param(
            0.05,
            type="number",
            minimum=0,
            maximum=1,
            title="Max. ambiguous mask pixels",
            description="Share of mask pixels between 16 and 240 above which a mask is rejected as not binary.",
        ),
        "max_megapixels": Param(
            50,
            type="number",
            minimum=1,
            title="Max. image size (megapixels)",
            description="Larger images are quarantined as image_too_large (decompression-bomb guard).",
        ),
    }


def cleaning_config(params: dict):
    """Build a ``CleaningConfig`` from a run's params; returns the dataclass."""
    from tasks.cleaning import CleaningConfig

    return CleaningConfig(
        working_size=int(params["working_size"]),
        max_ambiguous_fraction=float(params["max_ambiguous_fraction"]),
        max_pixels=int(float(params["max_megapixels"]) * 1_000_000),
    )
