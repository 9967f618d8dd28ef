"""The training configuration: one dataclass that travels as JSON to every backend.

``TrainConfig`` is what a DAG task, the CLI, ``torchrun`` workers and a Databricks entry point all
receive; ``to_dict``/``from_dict`` (and ``to_json``/``from_json``) round-trip it through plain
JSON, so it can be passed as an entry-point argument or written next to a job.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from tasks.model.config import MIN_INPUT_SIZE, MODEL_NAMES, RESIZE_MODES, TRAINING_SIZE, StageWidths, U2NetConfig

__all__ = ["AMP_MODES", "LOSSES", "RESIZE_MODES", "SCHEDULES", "TrainConfig"]

#: Accepted values of ``TrainConfig.loss`` (implemented in :mod:`tasks.train.losses`).
LOSSES: tuple[str, ...] = ("bce", "bce+iou", "bce+iou+ssim", "wbce+wiou")
#: Accepted values of ``TrainConfig.amp``.
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")
#: Accepted values of ``TrainConfig.schedule``.
SCHEDULES: tuple[str, ...] = ("cosine", "onecycle", "constant")
#: The cosine schedule's warm-up takes at most this share of the run's steps: a one-epoch fine-tune
#: with one epoch of warm-up would end at its peak learning rate, never decaying.
MAX_WARMUP_SHARE: float = 0.3
#: The learning rate a run fine-tunes trained weights with unless told otherwise (the
#: published or a registered model's: ``TrainConfig.lr``'s 1e-3 is the original U-2-Net's, from
#: scratch). One epoch on 148 real pairs from the published U2-NetP: test IoU 91.1 % at 1e-3, 97.1 %
#: at 5e-4 against 97.0 % for the start (benchmarks/README.md).
FINE_TUNE_LR: float = 5e-4
#: Seconds a worker waits in one collective for its peers before it fails instead of hanging
#: (torch.distributed, Horovod and the Spark distributor's workers).
COLLECTIVE_TIMEOUT_S: float = 1800.0
#: Accepted values of ``TrainConfig.device``.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")

# Fields that may differ between a run and its resumption without changing what is trained.
RESUME_FREE_FIELDS: frozenset[str] = frozenset(
    {
        "epochs", "num_workers", "mlflow_enabled", "mlflow_tracking_uri", "mlflow_experiment",
        "mlflow_run_name", "mlflow_artifact_location", "log_system_metrics", "tensorboard", "cache_dir",
        "storage_options", "max_steps_per_epoch", "batch_size_start", "device",
        "output_url",  # the folder the checkpoint is read from, wherever it was written (a moved folder)
    }
)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Data and outputs:
        dataset_url: a dataset version folder (local or ``s3://``) holding ``manifest.parquet``
            (and optionally ``augmented/manifest.parquet``).
        output_url: where ``checkpoint.pt``, ``model.pt`` and ``result.json`` go (local or
            ``s3://``). A run that finds ``checkpoint.pt`` here resumes from it.
        storage_options: fsspec options for both URLs (``s3fs``: key, secret, client_kwargs).
        cache_dir: local folder for downloaded pairs (default: ``$BGREMOVAL_CACHE`` or
            ``~/.cache/bgremoval/train``).
        train_split / val_split: manifest ``split`` values to train and validate on (``val_split``
            may be ``"train"`` to measure fit, as the overfit test does).
        use_augmented: add ``augmented/manifest.parquet`` rows to the training set when present.

    Model and optimisation:
        model: ``"u2net"`` or ``"u2netp"``; ``model_widths`` optionally overrides the channel
            widths (``{"encoder": [[mid, out]] * 6, "decoder": [[mid, out]] * 5}``), e.g. for a
            tiny test network.
        epochs: total epochs (a resumed run continues until this many are done).
        batch_size: samples per worker per step, or ``"auto"`` to probe the largest that fits
            (starting at ``batch_size_start`` and halving on out-of-memory errors).
        lr, weight_decay: AdamW learning rate and decoupled weight decay (0 → plain Adam, as in
            the original U2-Net: lr 1e-3, no decay).
        schedule: ``"cosine"`` (linear warm-up for ``warmup_epochs``, at most
            :data:`MAX_WARMUP_SHARE` of the run, then cosine to ``min_lr_ratio × lr``),
            ``"onecycle"`` or ``"constant"``; stepped every iteration.
        fused_weight: weight of the fused output's loss; the six side losses weigh 1 each (the
            original sums all seven with weight 1).
        loss: the loss of each output, one of :data:`LOSSES`: ``"bce"`` (the
            original), ``"bce+iou"``, ``"bce+iou+ssim"`` (BASNet's hybrid loss) or ``"wbce+wiou"`` (F3Net's
            boundary-weighted loss).
        input_size: the square network input (320 as in the paper); ``resize`` is
            ``"stretch"`` (the default, as U2-Net and rembg) or ``"letterbox"``.
        amp: ``"auto"`` (bf16 on a CPU with native bf16, fp16 with a gradient scaler on CUDA,
            otherwise off), ``"bf16"``, ``"fp16"`` (CUDA only) or ``"off"``.
        channels_last: use the channels-last memory format for the model and the inputs (the
            default: on the CPU 1.6-1.7x the training img/s of the contiguous layout, fp32 or bf16,
            side by side in ``benchmarks/train_throughput.py``).
        grad_clip: clip the gradient norm to this value (None: no clipping).
        init_from: URL of a state dict or checkpoint to start from (e.g. the champion's
            ``model.pt``); used only on a fresh start, never on resume.
        seed: seeds the sampler, the initial weights and the augmentation.
        num_workers: DataLoader worker processes per training process.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Tracking:
        mlflow_enabled: log to MLflow at all (False: results only under ``output_url``).
        mlflow_tracking_uri: MLflow tracking URI (None: ``$MLFLOW_TRACKING_URI`` / MLflow's
            default); ``mlflow_experiment``, ``mlflow_run_name``; ``mlflow_artifact_location``
            for a newly created experiment (None: ``$BGREMOVAL_MLFLOW_ARTIFACTS``, or an
            ``artifacts`` folder next to a ``sqlite:///`` database).
        log_system_metrics: ask MLflow to sample CPU/GPU/memory while the run is active.
        tensorboard: also write TensorBoard event files (only when ``tensorboard`` is installed).

    Tests:
        max_steps_per_epoch: stop each epoch after this many steps (None: the whole epoch).
        (A killed worker is simulated by :mod:`tasks.train.faults`, from the environment, not here.)
    """

    dataset_url: str
    output_url: str
    model: str = "u2netp"
    model_widths: dict[str, list[list[int]]] | None = None
    epochs: int = 10
    batch_size: int | str = 8
    batch_size_start: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    fused_weight: float = 1.0
    loss: str = "bce"
    grad_clip: float | None = None
    input_size: int = TRAINING_SIZE
    resize: str = "stretch"
    num_workers: int = 0
    seed: int = 0
    amp: str = "auto"
    channels_last: bool = True
    device: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    use_augmented: bool = True
    init_from: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    mlflow_enabled: bool = True
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "bgremoval"
    mlflow_run_name: str | None = None
    mlflow_artifact_location: str | None = None
    log_system_metrics: bool = True
    tensorboard: bool = True
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        key = "".join(c for c in str(self.model).lower() if c not in "-_ ")
        _choice("model", key, MODEL_NAMES)
        self.model = key
        if self.model_widths is not None:
            self.model_config()  # validates the widths
        for name in ("epochs", "batch_size_start", "input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.batch_size, str):
            if self.batch_size != "auto":
                if self.batch_size.isdigit():
                    self.batch_size = int(self.batch_size)
                else:
                    raise ValueError(f"batch_size must be a positive integer or 'auto', got {self.batch_size!r}")
        if isinstance(self.batch_size, bool) or (isinstance(self.batch_size, int) and self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {self.batch_size!r}")
        if self.input_size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size must be at least {MIN_INPUT_SIZE} px (the network pools 5 times), "
                             f"got {self.input_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("weight_decay and warmup_epochs must be >= 0 and min_lr_ratio in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}")
        _choice("amp", self.amp, AMP_MODES)
        _choice("loss", self.loss, LOSSES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("resize", self.resize, RESIZE_MODES)
        _choice("device", self.device, DEVICES)
        if not self.dataset_url or not self.output_url:
            raise ValueError("dataset_url and output_url are required")

    def model_config(self) -> U2NetConfig | None:
        """Return the :class:`U2NetConfig` built from ``model_widths`` (None when not set).

        Raises ``ValueError`` naming the expected shape when the widths are malformed."""
        if self.model_widths is None:
            return None
        try:
            encoder = tuple(StageWidths(int(m), int(o)) for m, o in self.model_widths["encoder"])
            decoder = tuple(StageWidths(int(m), int(o)) for m, o in self.model_widths["decoder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                "model_widths must be {'encoder': [[mid, out]] * 6, 'decoder': [[mid, out]] * 5}, "
                f"got {self.model_widths!r}"
            ) from exc
        return U2NetConfig(encoder=encoder, decoder=decoder)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of every field (``from_dict`` reverses it)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict such as ``to_dict()`` returns.

        Raises ``ValueError`` listing unknown keys (with the closest field name) so a typo in a
        DAG parameter fails loudly instead of being ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(hints)}")
        return cls(**data)

    def to_json(self) -> str:
        """Return the config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Parse a config from a JSON string made by ``to_json``."""
        return cls.from_dict(json.loads(text))


def default_lr(starts_from_weights: bool) -> float:
    """The learning rate a run gets when none is given: :data:`FINE_TUNE_LR` when it starts from
    trained weights, ``TrainConfig``'s (the original U-2-Net's, from scratch) otherwise."""
    return FINE_TUNE_LR if starts_from_weights else TrainConfig.lr
