"""``bgremoval_inference``'s trigger form and the ``ProductionConfig`` built from it."""

from __future__ import annotations

from airflow.sdk import Param
from bgremoval_airflow.params.common import (
    BATCH,
    MODEL_REFERENCE_PATTERN,
    PRODUCTION,
    batch_params,
    default,
    registered_model_param,
)

from tasks.core import layout
from tasks.model.refine_choice import REFINE_MODES
from tasks.feedback.production import PHOTOS_PER_SHARD, ProductionConfig


def production_params() -> dict[str, Param]:
    """The production pass (``ProductionConfig``) and which model runs it."""
    return {
        "quality_threshold": Param(
            0.0,
            type="number",
            minimum=0,
            maximum=1,
            title="Quality threshold",
            description="Results scoring at least this are published (and kept for retraining); lower ones go to "
            "the correction page. 0 means the champion's calibrated threshold (quality.json).",
            section=PRODUCTION,
        ),
        "background": Param(
            default(ProductionConfig, "background"),
            type="string",
            pattern=r"^#[0-9a-fA-F]{6}$",
            title="JPEG background",
            description="Colour behind the product in the published JPEG.",
            section=PRODUCTION,
        ),
        "canvas": Param(
            "",
            type="string",
            pattern=r"^$|^[0-9]+x[0-9]+$",
            title="Canvas (WxH)",
            description="Crop each product onto a fixed canvas, centred with a margin, e.g. 1000x1333; empty keeps "
            "the photo's frame.",
            section=PRODUCTION,
        ),
        "edge_refinement": Param(
            default(ProductionConfig, "refine"),
            type="string",
            enum=list(REFINE_MODES),
            title="Edge refinement",
            description="Pull each mask's outline onto the photo's edges. auto follows the choice measured for the model "
            "when it was calibrated (refinement.json); on; off publishes the network's map as resized.",
            section=PRODUCTION,
        ),
        "photos_per_shard": Param(
            PHOTOS_PER_SHARD,
            type="integer",
            minimum=1,
            maximum=10_000,
            title="Photos per shard",
            description="The drop is split into shards of this many photos, processed by parallel mapped tasks.",
            section=PRODUCTION,
        ),
        "model_uri": Param(
            "",
            type="string",
            pattern=MODEL_REFERENCE_PATTERN,
            title="Model",
            description="Empty: the champion of the registered model. Or a models:/ URI, or a folder with model.onnx.",
            section=PRODUCTION,
        ),
        "registered_model": registered_model_param(PRODUCTION),
    }


def drop_marker_param() -> Param:
    """Which ``_READY`` of the batch a run is for (set by ``bgremoval_drops``, which records it)."""
    return Param(
        "",
        type="string",
        pattern=r"^[0-9A-Za-z :.+_-]{0,64}$",
        title="Drop marker",
        description=f"When {layout.ready_key('<batch>', layout.INCOMING)} was written, for a run that bgremoval_drops "
        "started (a batch dropped again starts a run of its own). Empty for a run started by hand.",
        section=BATCH,
    )


def dag_params() -> dict[str, Param]:
    """The whole form of ``bgremoval_inference``."""
    return {**batch_params(layout.INCOMING), "ready": drop_marker_param(), **production_params()}


def production_config(params: dict) -> ProductionConfig:
    """The ``ProductionConfig`` of a production run."""
    threshold = float(params["quality_threshold"])
    return ProductionConfig(threshold=threshold or None, background=params["background"],
                            canvas=params["canvas"].strip() or None, refine=params["edge_refinement"])
