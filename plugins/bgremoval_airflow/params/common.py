"""Params that several DAGs share, and the one way a Param reads its default from a config dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any

from airflow.sdk import Param
from bgremoval_airflow.settings import configured_bucket, configured_registered_model

from tasks.core import layout
from tasks.data.config import CleaningConfig

#: Trigger-form sections (``Param(section=...)``), in the order the forms show them.
BATCH = "Batch"
CLEANING = "Cleaning"
REVIEW = "Clusters and review"
SPLITS = "Splits and augmentation"
TRAINING = "Training"
GATE = "Gate and registry"
PRODUCTION = "Production"
RETRAINING = "Retraining"


#: A registered model's name in MLflow.
REGISTERED_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: A model a run may name: empty, a keyword (auto, none, champion, pretrained, scratch), an ``@alias``,
#: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, a storage URL or an absolute path.
MODEL_REFERENCE_PATTERN = (r"^$|^[a-z]+$|^@[A-Za-z0-9_-]+$|^models:/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9_-]+|/[0-9]+)$"
                           r"|^(s3|gs|abfss|dbfs)://[^\s'\"]+$|^/[^\s'\"]+$")
#: A dataset version's name, or empty for none.
OPTIONAL_VERSION_PATTERN = r"^$|^[A-Za-z0-9][A-Za-z0-9._-]*$"


def default(config_class: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config_class`` (a Param's default is read
    from the config it fills, so each default is written once). Raises ``KeyError`` for a field
    that does not exist or has no plain default."""
    for field in dataclasses.fields(config_class):
        if field.name == name and field.default is not dataclasses.MISSING:
            return field.default
    raise KeyError(f"{config_class.__name__} has no field {name!r} with a plain default")


def batch_params(area: str = layout.RAW) -> dict[str, Param]:
    """Which drop to process (a folder under ``area``/) and in which bucket."""
    return {
        "batch": Param(
            "demo",
            type="string",
            minLength=1,
            pattern=layout.BATCH_NAME_PATTERN,
            title="Batch",
            description=f"Name of the folder under {area}/ that was uploaded, e.g. 2026-11-27-shoot-a. "
            f"The run waits until {layout.ready_key('<batch>', area)} exists.",
            section=BATCH,
        ),
        "bucket": bucket_param(),
    }


def bucket_param() -> Param:
    """The bucket of the storage layout (default: the deployment's ``[bgremoval] bucket``)."""
    return Param(
        configured_bucket(),
        type="string",
        minLength=3,
        pattern=layout.BUCKET_NAME_PATTERN,
        title="S3 bucket",
        description="Bucket holding raw/, datasets/ and the rest of the storage layout.",
        section=BATCH,
    )


def working_size_param(section: str = CLEANING) -> Param:
    """The longer side of cleaned pairs (``CleaningConfig.working_size``)."""
    return Param(
        default(CleaningConfig, "working_size"),
        type="integer",
        minimum=32,
        maximum=2048,
        title="Working resolution (px)",
        description="Clean pairs larger than this are shrunk so that their longer side has this many pixels "
        "(aspect kept); smaller ones keep their size.",
        section=section,
    )


def registered_model_param(section: str = GATE) -> Param:
    """The MLflow registered model whose champion serves and whose versions training adds (default:
    the deployment's, :func:`bgremoval_airflow.settings.configured_registered_model`)."""
    return Param(
        configured_registered_model(),
        type="string",
        minLength=1,
        pattern=REGISTERED_MODEL_PATTERN,
        title="Registered model",
        description="MLflow registered model: a passing model becomes a new version with the alias 'champion'; "
        "the former champion gets 'previous'. Production uses its champion.",
        section=section,
    )
