"""DAG ``Param`` definitions shared by the bgremoval DAGs, and their conversion to config dataclasses."""

from __future__ import annotations

from airflow.sdk import Param

DEFAULT_BUCKET = "bgremoval"


def batch_params(folder: str = "raw") -> dict[str, Param]:
    """Params that say which batch to process (a folder under ``folder``/) and in which bucket."""
    return {
        "batch": Param(
            "demo",
            type="string",
            minLength=1,
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            title="Studio batch",
            description=f"Name of the folder under {folder}/ that was uploaded, e.g. 2026-11-27-shoot-a. "
            f"The run waits until {folder}/<batch>/_READY exists.",
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
    """Params of the cleaning stage (see ``tasks.data.cleaning.CleaningConfig``)."""
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
        "audit_model": Param(
            "none",
            type="string",
            title="Mask audit: model check",
            description="A model whose cut-outs the mask audit compares each mask with (a confident model that "
            "disagrees flags the mask as model_disagrees and keeps it out of training until reviewed). 'none' "
            "(default): structural checks only; 'auto': the registered model's champion, else the published U2-NetP "
            "weights; 'champion', 'pretrained', or a model URL / .onnx file. Off by default: on correct masks it "
            "flags the photos the model gets wrong, i.e. the hardest training examples (README, 'The mask audit').",
        ),
    }


def cleaning_config(params: dict):
    """Build a ``CleaningConfig`` from a run's params; returns the dataclass."""
    from tasks.data.cleaning import CleaningConfig

    return CleaningConfig(
        working_size=int(params["working_size"]),
        max_ambiguous_fraction=float(params["max_ambiguous_fraction"]),
        max_pixels=int(float(params["max_megapixels"]) * 1_000_000),
    )


def review_params() -> dict[str, Param]:
    """Params of clustering, the review gate, splits and augmentation."""
    return {
        "clusters": Param(
            6,
            type="integer",
            minimum=2,
            maximum=20,
            title="Product clusters (k)",
            description="k-means proposes this many product clusters for the reviewers to correct.",
        ),
        "seed": Param(
            0,
            type="integer",
            minimum=0,
            title="Random seed",
            description="Seeds clustering, splits and augmentation so a run can be repeated exactly.",
        ),
        "val_fraction": Param(
            0.1,
            type="number",
            minimum=0,
            maximum=0.5,
            title="Validation share",
            description="Share of each product cluster held out for validation.",
        ),
        "test_fraction": Param(
            0.1,
            type="number",
            minimum=0,
            maximum=0.5,
            title="Test share",
            description="Share of each product cluster held out for the final test (kept stable across versions).",
        ),
        "previous_dataset": Param(
            "",
            type="string",
            title="Previous dataset version",
            description="Optional: an earlier dataset version under datasets/ whose train/val/test assignment is kept, "
            "so no image moves between splits when the dataset grows.",
        ),
        "target_per_cluster": Param(
            200,
            type="integer",
            minimum=0,
            title="Training images per cluster",
            description="Augmentation tops up the train split of each rarer cluster to this many images.",
        ),
    }


def split_config(params: dict):
    """Build a ``SplitConfig`` from a run's params; returns the dataclass."""
    from tasks.data.splits import SplitConfig

    val, test = float(params["val_fraction"]), float(params["test_fraction"])
    return SplitConfig(train=round(1.0 - val - test, 10), val=val, test=test, seed=int(params["seed"]))


def augment_config(params: dict, working_size: int):
    """Build an ``AugmentConfig`` from a run's params; returns the dataclass."""
    from tasks.data.augment import AugmentConfig

    return AugmentConfig(target_per_cluster=int(params["target_per_cluster"]), seed=int(params["seed"]), working_size=working_size)


def review_page_url(version: str, bucket: str) -> str:
    """Absolute URL of the review page of a dataset version (from ``[api] base_url``)."""
    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="").rstrip("/")
    return f"{base}/bgremoval/review/{version}?bucket={bucket}"


def mask_review_page_url(version: str, bucket: str) -> str:
    """Absolute URL of the page that lists a dataset version's flagged masks (Keep / Exclude / Fix)."""
    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="").rstrip("/")
    return f"{base}/bgremoval/review/{version}/masks?bucket={bucket}"


def report_page_url(bucket: str, report_url: str) -> str | None:
    """The Airflow UI address of an evaluation report written at
    ``s3://<bucket>/training/<version>/<run>/report`` (None for a report stored elsewhere)."""
    import re

    from airflow.configuration import conf

    match = re.fullmatch(rf"s3://{re.escape(bucket)}/training/([^/]+)/([^/]+)/report/?", report_url)
    if not match:
        return None
    base = conf.get("api", "base_url", fallback="").rstrip("/")
    return f"{base}/bgremoval/reports/{match.group(1)}/{match.group(2)}?bucket={bucket}"


def training_params() -> dict[str, Param]:
    """Params of the training step (see ``tasks.train.config.TrainConfig``)."""
    return {
        "compute": Param(
            "local",
            type="string",
            enum=["local", "databricks"],
            title="Where to train",
            description="local: torch.distributed workers on the Airflow worker. databricks: a new GPU job "
            "cluster trains with Spark's TorchDistributor (see the databricks_* parameters).",
        ),
        "model": Param(
            "u2netp",
            type="string",
            enum=["u2netp", "u2net"],
            title="Model",
            description="U2-NetP (1.1 M parameters, fast) or U2-Net (44 M parameters, the seed's model).",
        ),
        "epochs": Param(10, type="integer", minimum=1, title="Epochs", description="Training epochs over the balanced train split."),
        "batch_size": Param(
            8,
            type="integer",
            minimum=1,
            title="Batch size per worker",
            description="Images per worker and step; the effective batch is this times the number of workers.",
        ),
        "learning_rate": Param(
            0.001, type="number", exclusiveMinimum=0, title="Learning rate", description="Peak Adam learning rate (cosine schedule with warm-up)."
        ),
        "train_input_size": Param(
            320,
            type="integer",
            minimum=32,
            maximum=1024,
            title="Training input size (px)",
            description="Images are resized to this square size for training (U2-Net's own size is 320).",
        ),
        "workers": Param(
            2,
            type="integer",
            minimum=1,
            maximum=64,
            title="Local worker processes",
            description="compute=local: torch.distributed worker processes on the Airflow worker (gloo on CPU, NCCL on GPU).",
        ),
        "max_steps_per_epoch": Param(
            0,
            type="integer",
            minimum=0,
            title="Max. steps per epoch",
            description="Cap on optimiser steps per epoch for quick trial runs; 0 means no cap.",
        ),
        "dataset_version": Param(
            "",
            type="string",
            pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]*$",
            title="Existing dataset version (retraining)",
            description="Train on this version under datasets/ instead of a new studio batch: the sensor, cleaning, "
            "clustering and the review gate are skipped; its splits are kept. The retraining DAG sets it.",
        ),
        "init_from": Param(
            "auto",
            type="string",
            title="Initial weights",
            description="'auto' (default): the registered model's champion when there is one, else the published "
            "U2-NetP weights ('pretrained'; U2-NetP only). Or 'pretrained', 'champion', 'scratch' (random weights), "
            "a models:/ URI, or the URL of a model.pt / checkpoint. Retraining starts from the champion.",
        ),
    }


def train_config(params: dict, dataset_url: str, output_url: str, storage_options: dict):
    """Build the ``TrainConfig`` of a run; returns the dataclass.

    The MLflow tracking URI comes from the worker's ``MLFLOW_TRACKING_URI``.
    """
    import os

    from tasks.train.config import TrainConfig

    return TrainConfig(
        dataset_url=dataset_url,
        output_url=output_url,
        model=params["model"],
        epochs=int(params["epochs"]),
        batch_size=int(params["batch_size"]),
        lr=float(params["learning_rate"]),
        input_size=int(params["train_input_size"]),
        seed=int(params["seed"]),
        channels_last=True,
        init_from=None,  # the DAG stages the chosen weights (registry.choose_start) and sets the URL
        max_steps_per_epoch=int(params["max_steps_per_epoch"]) or None,
        storage_options=storage_options,
        mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        mlflow_run_name=f"{params['batch']}",
    )


def evaluation_params() -> dict[str, Param]:
    """Params of the evaluation gate and the registry (see ``tasks.evaluation.gate.GateConfig``)."""
    return {
        "iou_gate": Param(
            0.97,
            type="number",
            minimum=0,
            maximum=1,
            title="Gate: mean IoU",
            description="The new model must reach at least this mean IoU on the test split (0.97 = 97 %).",
        ),
        "cluster_iou_gate": Param(
            0.95,
            type="number",
            minimum=0,
            maximum=1,
            title="Gate: IoU of every cluster",
            description="Every product cluster's mean IoU on the test split must reach this.",
        ),
        "tolerance": Param(
            0.002,
            type="number",
            minimum=0,
            maximum=1,
            title="Gate: tolerance against the champion",
            description="The new model may score at most this much below the current champion's mean IoU "
            "(both are evaluated on the same test split in the same task).",
        ),
        "routing_target_iou": Param(
            0.97,
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Production: IoU a person should fix below",
            description="The quality threshold is calibrated on the val split so that results whose IoU would fall "
            "below this go to the correction page (with 90 % recall).",
        ),
        "registered_model": Param(
            "bgremoval-u2net",
            type="string",
            minLength=1,
            title="Registered model",
            description="MLflow registered model: a passing model becomes a new version with the alias 'champion'; "
            "the former champion gets 'previous'.",
        ),
    }


def assessment_config(params: dict):
    """Build the ``AssessmentConfig`` (gate thresholds, registered model) from the run's params."""
    from tasks.evaluation.assessment import AssessmentConfig
    from tasks.evaluation.gate import GateConfig

    gate = GateConfig(iou_gate=float(params["iou_gate"]), cluster_iou_gate=float(params["cluster_iou_gate"]),
                      tolerance=float(params["tolerance"]))
    return AssessmentConfig(gate=gate, registered_model=params["registered_model"])


def production_params() -> dict[str, Param]:
    """Params of the production pass (see ``tasks.feedback.production.ProductionConfig``)."""
    return {
        "quality_threshold": Param(
            0.0,
            type="number",
            minimum=0,
            maximum=1,
            title="Quality threshold",
            description="Results scoring at least this are published (and kept for retraining); lower ones go to "
            "the correction page. 0 means the champion's calibrated threshold (quality.json).",
        ),
        "background": Param(
            "#ffffff",
            type="string",
            pattern=r"^#[0-9a-fA-F]{6}$",
            title="JPEG background",
            description="Colour behind the product in the published JPEG.",
        ),
        "canvas": Param(
            "",
            type="string",
            pattern=r"^$|^[0-9]+x[0-9]+$",
            title="Canvas (WxH)",
            description="Crop each product onto a fixed canvas, centred with a margin, e.g. 1000x1333; empty keeps "
            "the photo's frame.",
        ),
        "shard_size": Param(
            200,
            type="integer",
            minimum=1,
            title="Photos per shard",
            description="The drop is split into shards of this many photos, processed by parallel mapped tasks.",
        ),
        "model_uri": Param(
            "",
            type="string",
            title="Model",
            description="Empty: the champion of the registered model. Or a models:/ URI, or a folder with model.onnx.",
        ),
    }


def production_config(params: dict):
    """Build the ``ProductionConfig`` of a production run from its params."""
    from tasks.feedback.production import ProductionConfig

    threshold = float(params["quality_threshold"])
    return ProductionConfig(threshold=threshold or None, background=params["background"],
                            canvas=params["canvas"].strip() or None)


#: The Airflow Asset the production DAG updates when pairs enter the retraining pool.
RETRAINING_POOL_ASSET_NAME = "bgremoval_retraining_pool"


def retraining_params() -> dict[str, Param]:
    """Params of the retraining loop (see ``tasks.feedback.retraining.RetrainingConfig``)."""
    return {
        "min_new_pairs": Param(
            50,
            type="integer",
            minimum=1,
            title="Least new pairs",
            description="Retrain only when at least this many new pairs (published, accepted or corrected) are in "
            "the retraining pool since the last retraining.",
        ),
        "retrain_epochs": Param(
            3,
            type="integer",
            minimum=1,
            title="Retraining epochs",
            description="Epochs of the triggered training run; it starts from the champion's weights.",
        ),
        "base_dataset": Param(
            "",
            type="string",
            pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]*$",
            title="Base dataset version",
            description="Empty: the champion's dataset version (its registry tag). Its rows and splits are kept; "
            "the test split does not change.",
        ),
        "val_fraction": Param(
            0.1,
            type="number",
            minimum=0,
            maximum=0.9,
            title="Validation share of new pairs",
            description="New pairs go to train or val (hash of the name), never to test.",
        ),
        "training_conf": Param(
            {},
            type="object",
            title="Other training parameters",
            description="Passed to bgremoval_training as they are, e.g. {\"workers\": 4, \"iou_gate\": 0.98}.",
        ),
    }
