"""``bgremoval_retraining``'s trigger form and the ``RetrainingConfig`` built from it."""

from __future__ import annotations

from airflow.sdk import Param
from bgremoval_airflow.databricks import databricks_params
from bgremoval_airflow.params import training
from bgremoval_airflow.params.common import (
    OPTIONAL_VERSION_PATTERN,
    RETRAINING,
    bucket_param,
    default,
    registered_model_param,
    working_size_param,
)

from tasks.feedback.config import RetrainingConfig


def retraining_params() -> dict[str, Param]:
    """When the loop retrains, on what, and what the triggered training run is asked to do."""
    return {
        "min_new_pairs": Param(
            default(RetrainingConfig, "min_new_pairs"),
            type="integer",
            minimum=1,
            maximum=10_000_000,
            title="Least new pairs",
            description="Retrain only when at least this many new pairs (published, accepted or corrected) are in "
            "the retraining pool since the last retraining.",
            section=RETRAINING,
        ),
        "retrain_epochs": Param(
            3,
            type="integer",
            minimum=1,
            maximum=1000,
            title="Retraining epochs",
            description="Epochs of the triggered training run; it starts from the champion's weights.",
            section=RETRAINING,
        ),
        "base_dataset": Param(
            "",
            type="string",
            pattern=OPTIONAL_VERSION_PATTERN,
            title="Base dataset version",
            description="Empty: the champion's dataset version (its registry tag). Its rows and splits are kept; "
            "the test split does not change.",
            section=RETRAINING,
        ),
        "new_pairs_val_fraction": Param(
            default(RetrainingConfig, "val_fraction"),
            type="number",
            minimum=0,
            maximum=0.9,
            title="Validation share of new pairs",
            description="New pairs go to train or val (hash of the name), never to test.",
            section=RETRAINING,
        ),
        "training_conf": Param(
            {},
            type="object",
            propertyNames={"enum": training_param_names()},
            title="Other training parameters",
            description="Passed to bgremoval_training as they are, e.g. {\"workers\": 4, \"iou_gate\": 0.98, "
            "\"loss\": \"bce+iou\"}; each key one of its Params except those this form sets (bucket, dataset_version, "
            "init_from, epochs, registered_model, working_size). The champion's model, train_input_size and loss are "
            "used unless set here (a model other than the champion's is refused: the run starts from its weights). "
            "A typo is refused when the run is triggered.",
            section=RETRAINING,
        ),
    }


#: The training run's Params that the retraining sets itself (``training_request``): not in ``training_conf``.
SET_BY_RETRAINING = ("bucket", "dataset_version", "init_from", "epochs", "registered_model", "working_size")


def training_param_names() -> list[str]:
    """The Params of ``bgremoval_training`` that ``training_conf`` may set: all but
    :data:`SET_BY_RETRAINING` (``retrain_epochs`` is the retraining's own)."""
    return sorted(set({**training.dag_params(), **databricks_params()}) - set(SET_BY_RETRAINING))


def dag_params() -> dict[str, Param]:
    """The whole form of ``bgremoval_retraining``."""
    return {"bucket": bucket_param(), "working_size": working_size_param(RETRAINING),
            "registered_model": registered_model_param(RETRAINING), **retraining_params()}


def retraining_config(params: dict) -> RetrainingConfig:
    """``RetrainingConfig`` from the retraining DAG's params."""
    return RetrainingConfig(min_new_pairs=int(params["min_new_pairs"]), working_size=int(params["working_size"]),
                            val_fraction=float(params["new_pairs_val_fraction"]))
