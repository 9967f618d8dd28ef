"""``bgremoval_training``'s trigger form, in sections, and the stage configs built from it.

Every default is read from the config dataclass the Param fills (:func:`.common.default`), except
where the DAG deliberately differs (stated in the Param's description).
"""

from __future__ import annotations

from airflow.sdk import Param
from bgremoval_airflow.params.common import (
    BATCH,
    MODEL_REFERENCE_PATTERN,
    OPTIONAL_VERSION_PATTERN,
    CLEANING,
    GATE,
    REVIEW,
    SPLITS,
    TRAINING,
    batch_params,
    default,
    registered_model_param,
    working_size_param,
)

from tasks.core.limits import MAX_PIXELS
from tasks.core.shards import PAIRS_PER_SHARD
from tasks.data.config import AugmentConfig, CleaningConfig, ClusteringConfig, SplitConfig
from tasks.evaluation.gate import GateConfig
from tasks.model.config import MODEL_NAMES
from tasks.serving.quality import TARGET_IOU
from tasks.train.config import FINE_TUNE_LR, LOSSES, TrainConfig, default_lr

#: k-means restarts in the DAG: more than ``ClusteringConfig``'s quick default, as a reviewer waits on it.
CLUSTERING_RESTARTS = 30


def cleaning_params() -> dict[str, Param]:
    """Cleaning (``CleaningConfig``) and how the batch is cut into mapped tasks."""
    return {
        "working_size": working_size_param(),
        "shard_size": Param(
            PAIRS_PER_SHARD,
            type="integer",
            minimum=1,
            maximum=100_000,
            title="Pairs per shard",
            description="The batch is split into shards of this many pairs, cleaned (and featurised) in parallel "
            "by mapped tasks.",
            section=CLEANING,
        ),
        "max_ambiguous_fraction": Param(
            default(CleaningConfig, "max_ambiguous_fraction"),
            type="number",
            minimum=0,
            maximum=1,
            title="Max. ambiguous mask pixels",
            description="Share of mask pixels between 16 and 240 above which a mask is rejected as not binary.",
            section=CLEANING,
        ),
        "max_megapixels": Param(
            default(CleaningConfig, "max_pixels") / 1_000_000,
            type="number",
            minimum=1,
            maximum=MAX_PIXELS / 1_000_000,  # a run may lower the decompression-bomb cap, never lift it
            title="Max. image size (megapixels)",
            description="Larger images are quarantined as image_too_large (decompression-bomb guard).",
            section=CLEANING,
        ),
        "audit_model": Param(
            "none",
            type="string",
            pattern=MODEL_REFERENCE_PATTERN,
            title="Mask audit: model check",
            description="A model whose cut-outs the mask audit compares each mask with (a confident model that "
            "disagrees flags the mask as model_disagrees and keeps it out of training until reviewed). 'none' "
            "(default): structural checks only; 'auto': the registered model's champion, else the published U2-NetP "
            "weights; 'champion', 'pretrained', or a model URL / .onnx file. Off by default: on correct masks it "
            "flags the photos the model gets wrong, i.e. the hardest training examples (README, 'The mask audit').",
            section=CLEANING,
        ),
    }


def review_params() -> dict[str, Param]:
    """Clustering, the review gate, splits and augmentation."""
    return {
        "clusters": Param(
            default(ClusteringConfig, "k"),
            type="integer",
            minimum=2,
            maximum=20,
            title="Product clusters (k)",
            description="k-means proposes this many product clusters for the reviewers to correct.",
            section=REVIEW,
        ),
        "seed": Param(
            default(SplitConfig, "seed"),
            type="integer",
            minimum=0,
            maximum=2**31 - 1,
            title="Random seed",
            description="Seeds clustering, splits, augmentation and training so a run can be repeated exactly.",
            section=REVIEW,
        ),
        "val_fraction": Param(
            default(SplitConfig, "val"),
            type="number",
            minimum=0,
            maximum=0.5,
            title="Validation share",
            description="Share of each product cluster held out for validation.",
            section=SPLITS,
        ),
        "test_fraction": Param(
            default(SplitConfig, "test"),
            type="number",
            minimum=0,
            maximum=0.5,
            title="Test share",
            description="Share of each product cluster held out for the final test (kept stable across versions).",
            section=SPLITS,
        ),
        "previous_dataset": Param(
            "",
            type="string",
            pattern=OPTIONAL_VERSION_PATTERN,
            title="Previous dataset version",
            description="Optional: an earlier dataset version under datasets/ whose train/val/test assignment is kept, "
            "so no image moves between splits when the dataset grows.",
            section=SPLITS,
        ),
        "target_per_cluster": Param(
            default(AugmentConfig, "target_per_cluster"),
            type="integer",
            minimum=0,
            maximum=1_000_000,
            title="Training images per cluster",
            description="Augmentation tops up the train split of each rarer cluster to this many images.",
            section=SPLITS,
        ),
    }


def training_params() -> dict[str, Param]:
    """The training step (``TrainConfig``), where it runs and what it starts from."""
    return {
        "dataset_version": Param(
            "",
            type="string",
            pattern=OPTIONAL_VERSION_PATTERN,
            title="Existing dataset version (retraining)",
            description="Train on this version under datasets/ instead of a new studio batch: the sensor, cleaning, "
            "clustering and the review gate are skipped; its splits are kept. The retraining DAG sets it.",
            section=BATCH,
        ),
        "compute": Param(
            "local",
            type="string",
            enum=["local", "databricks"],
            title="Where to train",
            description="local: torch.distributed workers on the Airflow worker. databricks: a new GPU job "
            "cluster trains with Spark's TorchDistributor (see the Databricks section).",
            section=TRAINING,
        ),
        "model": Param(
            default(TrainConfig, "model"),
            type="string",
            enum=list(MODEL_NAMES),
            title="Model",
            description="U2-NetP (1.1 M parameters, fast) or U2-Net (44 M parameters, the seed's model).",
            section=TRAINING,
        ),
        "init_from": Param(
            "auto",
            type="string",
            pattern=MODEL_REFERENCE_PATTERN,
            title="Initial weights",
            description="'auto' (default): the registered model's champion when there is one (of the same "
            "architecture), else the published weights of the chosen model ('pretrained'; U2-Net's once fetched with "
            "bgremoval pretrained fetch --model u2net). Or 'pretrained', 'champion', 'scratch' (random weights), "
            "a models:/ URI, or the URL of a model.pt / checkpoint. Retraining starts from the champion.",
            section=TRAINING,
        ),
        "epochs": Param(default(TrainConfig, "epochs"), type="integer", minimum=1, maximum=1000, title="Epochs",
                        description="Training epochs over the balanced train split.", section=TRAINING),
        "batch_size": Param(
            default(TrainConfig, "batch_size"),
            type="integer",
            minimum=1,
            maximum=4096,
            title="Batch size per worker",
            description="Images per worker and step; the effective batch is this times the number of workers.",
            section=TRAINING,
        ),
        "learning_rate": Param(
            None,
            type=["null", "number"],
            exclusiveMinimum=0,
            maximum=1,
            title="Learning rate",
            description=f"Peak Adam learning rate (cosine schedule, warm-up at most 30 % of the run). Empty: "
            f"{FINE_TUNE_LR:g} when the run starts from trained weights (init_from auto, pretrained, champion: "
            f"a higher rate undoes them on a few hundred pairs), {TrainConfig.lr:g} from scratch.",
            section=TRAINING,
        ),
        "loss": Param(
            default(TrainConfig, "loss"),
            type="string",
            enum=list(LOSSES),
            title="Loss",
            description="Of each of the seven outputs: bce (U2-Net's own), bce+iou, bce+iou+ssim (BASNet's hybrid) or "
            "wbce+wiou (F3Net's, weighing the band along the outline; benchmarks/README.md compares them on real "
            "photos).",
            section=TRAINING,
        ),
        "train_input_size": Param(
            default(TrainConfig, "input_size"),
            type="integer",
            minimum=32,
            maximum=1024,
            title="Training input size (px)",
            description="Images are resized to this square size for training (U2-Net's own size is 320).",
            section=TRAINING,
        ),
        "workers": Param(
            2,
            type="integer",
            minimum=1,
            maximum=64,
            title="Local worker processes",
            description="compute=local: torch.distributed worker processes on the Airflow worker (gloo on CPU, "
            "NCCL on GPU).",
            section=TRAINING,
        ),
        "max_steps_per_epoch": Param(
            0,
            type="integer",
            minimum=0,
            maximum=10_000_000,
            title="Max. steps per epoch",
            description="Cap on optimiser steps per epoch for quick trial runs; 0 means no cap.",
            section=TRAINING,
        ),
    }


def evaluation_params() -> dict[str, Param]:
    """The evaluation gate (``GateConfig``), the routing target and the registry."""
    return {
        "iou_gate": Param(
            default(GateConfig, "iou_gate"),
            type="number",
            minimum=0,
            maximum=1,
            title="Gate: mean IoU",
            description="The new model must reach at least this mean IoU on the test split (0.97 = 97 %).",
            section=GATE,
        ),
        "cluster_iou_gate": Param(
            default(GateConfig, "cluster_iou_gate"),
            type="number",
            minimum=0,
            maximum=1,
            title="Gate: IoU of every cluster",
            description="Every product cluster's mean IoU on the test split must reach this.",
            section=GATE,
        ),
        "tolerance": Param(
            default(GateConfig, "tolerance"),
            type="number",
            minimum=0,
            maximum=1,
            title="Gate: tolerance against the champion",
            description="The new model may score at most this much below the current champion's mean IoU "
            "(both are evaluated on the same test split in the same task).",
            section=GATE,
        ),
        "gate_failure": Param(
            "fail",
            type="string",
            enum=["fail", "skip"],
            title="Gate: when the new model fails it",
            description="fail: check_gate fails with the gate's reasons and the run ends failed (red in the UI; the "
            "failure notices fire), so a retraining loop whose models stop passing is seen; skip: promotion is "
            "skipped and the run ends successful.",
            section=GATE,
        ),
        "routing_target_iou": Param(
            TARGET_IOU,
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Production: IoU a person should fix below",
            description="The quality threshold is calibrated on the val split so that results whose IoU would fall "
            "below this go to the correction page (with 90 % recall).",
            section=GATE,
        ),
        "registered_model": registered_model_param(),
    }


def dag_params() -> dict[str, Param]:
    """The whole form of ``bgremoval_training`` except the Databricks section."""
    return {**batch_params(), **cleaning_params(), **review_params(), **training_params(), **evaluation_params()}


def cleaning_config(params: dict) -> CleaningConfig:
    """``CleaningConfig`` from a run's params."""
    return CleaningConfig(
        working_size=int(params["working_size"]),
        max_ambiguous_fraction=float(params["max_ambiguous_fraction"]),
        max_pixels=int(float(params["max_megapixels"]) * 1_000_000),
    )


def clustering_config(params: dict) -> ClusteringConfig:
    """``ClusteringConfig`` from a run's params."""
    return ClusteringConfig(k=int(params["clusters"]), seed=int(params["seed"]), n_init=CLUSTERING_RESTARTS)


def split_config(params: dict) -> SplitConfig:
    """``SplitConfig`` from a run's params (train is what val and test leave). Raises ``ValueError``
    when they leave none: a dataset without training pairs cannot train."""
    val, test = float(params["val_fraction"]), float(params["test_fraction"])
    train = round(1.0 - val - test, 10)
    if train <= 0:
        raise ValueError(f"val_fraction {val:g} + test_fraction {test:g} leave no training pairs: together they must "
                         "stay below 1 (0.1 + 0.1 is the default)")
    return SplitConfig(train=train, val=val, test=test, seed=int(params["seed"]))


def augment_config(params: dict) -> AugmentConfig:
    """``AugmentConfig`` from a run's params (augmented pairs at the working size)."""
    return AugmentConfig(target_per_cluster=int(params["target_per_cluster"]), seed=int(params["seed"]),
                         working_size=int(params["working_size"]))


def train_config(params: dict, dataset_url: str, output_url: str, storage_options: dict,
                 init_from: str | None = None) -> TrainConfig:
    """The ``TrainConfig`` of a run starting from ``init_from`` (the weights the DAG staged; None: random).
    The MLflow tracking URI comes from the worker's ``MLFLOW_TRACKING_URI``; an empty learning rate
    is :func:`tasks.train.config.default_lr`'s for that start."""
    import os

    given = params.get("learning_rate")

    return TrainConfig(
        dataset_url=dataset_url,
        output_url=output_url,
        model=params["model"],
        epochs=int(params["epochs"]),
        batch_size=int(params["batch_size"]),
        lr=float(given) if given is not None else default_lr(init_from is not None),
        input_size=int(params["train_input_size"]),
        loss=params["loss"],
        seed=int(params["seed"]),
        init_from=init_from,
        max_steps_per_epoch=int(params["max_steps_per_epoch"]) or None,
        storage_options=storage_options,
        mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        mlflow_run_name=f"{params['batch']}",
    )


def assessment_config(params: dict):
    """The ``AssessmentConfig`` (gate thresholds, registered model) of a run."""
    from tasks.evaluation.assessment import AssessmentConfig

    gate = GateConfig(iou_gate=float(params["iou_gate"]), cluster_iou_gate=float(params["cluster_iou_gate"]),
                      tolerance=float(params["tolerance"]))
    return AssessmentConfig(gate=gate, registered_model=params["registered_model"])
