"""The one training function every backend runs: :func:`train`.

``train(config, rank_info)`` is called once per worker (one process alone, each ``torchrun``
worker, each Horovod or TorchDistributor worker). It

* reads the dataset version's pairs (downloaded once per machine into a local cache),
* builds U2-Net/U2-NetP, optionally from ``init_from`` weights, and trains it with
  deep supervision (BCE-with-logits on the fused map and the six side maps, summed), AdamW,
  a learning-rate schedule stepped every iteration, autocast mixed precision and channels-last,
* samples clusters equally (:class:`~tasks.train.data.ClusterBalancedDistributedSampler`) with a
  disjoint share of every epoch per worker,
* validates every epoch (loss, and mean per-image IoU of ``sigmoid(fused) > 0.5``), averaging
  every metric over all workers,
* on rank 0 only: logs params and per-epoch metrics to MLflow (and TensorBoard when installed),
  writes ``checkpoint.pt`` after every epoch, and at the end ``model.pt`` and ``result.json``,
* resumes automatically: when ``<output_url>/checkpoint.pt`` exists, training continues from the
  epoch after it, in the same MLflow run, and no epoch is logged twice.

Output layout under ``output_url``: ``checkpoint.pt`` (latest epoch), ``model.pt`` (the final
state dict), ``result.json`` (:class:`TrainResult`), ``config.json``, ``mlflow_run_id``,
``weights-rank<r>.sha256`` (each worker's final weights hash: all equal after a correct
data-parallel run) and, with TensorBoard installed, ``tensorboard/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tasks.core import layout, storage
from tasks.core.heap import keep_freed_memory
from tasks.model.u2net import U2Net, U2NetOutput, build_model, count_parameters
from tasks.model.pretrained import has_identity_batchnorm, unfold_batchnorm
from tasks.train.batch_size import find_batch_size, training_step_probe
from tasks.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_state_dict_from_url,
    restore_rng_state,
    save_checkpoint,
    state_dict_sha256,
)
from tasks.train.collectives import Collectives, RankInfo, default_collectives
from tasks.train.config import MAX_WARMUP_SHARE, RESUME_FREE_FIELDS, TrainConfig
from tasks.train.faults import exit_if_asked
from tasks.train.data import ClusterBalancedDistributedSampler, SegmentationDataset, ShardSampler, prepare_split
from tasks.train.losses import segmentation_losses

__all__ = [
    "EpochMetrics",
    "TrainResult",
    "build_scheduler",
    "resumed_phase",
    "cpu_supports_bf16",
    "deep_supervision_loss",
    "resolve_amp",
    "resolve_device",
    "resume_conflicts",
    "settings_in",
    "train",
]

log = logging.getLogger(__name__)

#: Metric names logged to MLflow every epoch (step = epoch number, starting at 1).
EPOCH_METRICS = ("train_loss", "val_loss", "val_iou", "lr", "epoch_seconds", "train_images_per_s")
# Config fields never logged or written out (credentials, test hooks).
_PRIVATE_FIELDS = ("storage_options",)


@dataclass
class EpochMetrics:
    """One epoch's metrics, already averaged over all workers.

    ``train_loss``: mean deep-supervision loss per training image; ``val_loss`` and ``val_iou``
    (mean per-image IoU at threshold 0.5): over the validation split, None when it is empty;
    ``lr``: the learning rate after the epoch's last step; ``images``: training images seen by
    all workers; ``seconds``: wall time of the epoch including validation; ``data_wait_s``: how long
    a worker's training loop waited for its next batch from the data loader (mean over workers): near
    zero when the loader keeps the device busy, a large share of ``seconds`` when it does not (raise
    ``num_workers``).
    """

    epoch: int
    train_loss: float
    val_loss: float | None
    val_iou: float | None
    lr: float
    images: int
    seconds: float
    data_wait_s: float = 0.0

    @property
    def data_wait_share(self) -> float:
        """The share of the epoch's wall time spent waiting for batches."""
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Training throughput of the whole run over this epoch (images per second)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def mlflow_metrics(self) -> dict[str, float]:
        """The metrics as MLflow logs them (None values left out)."""
        values = {"train_loss": self.train_loss, "val_loss": self.val_loss, "val_iou": self.val_iou,
                  "lr": self.lr, "epoch_seconds": self.seconds, "train_images_per_s": self.images_per_s,
                  "data_wait_share": self.data_wait_share}
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass
class TrainResult:
    """What a training run returns (and writes to ``result.json``).

    ``metrics``: the last epoch's ``train_loss``, ``val_loss``, ``val_iou`` and ``lr``;
    ``history``: every epoch's :class:`EpochMetrics` as dicts (including those run before a
    resume); ``epochs_completed``: epochs done in total; ``epochs_run``: epochs run by this call;
    ``start_epoch``: the first epoch this call ran (``epochs_completed + 1`` when there was
    nothing left to do); ``batch_size``: per worker; ``weights_sha256``: hash of the final state
    dict (see :func:`~tasks.train.checkpoint.state_dict_sha256`).
    """

    model: str
    epochs: int
    epochs_completed: int
    epochs_run: int
    start_epoch: int
    resumed: bool
    metrics: dict[str, float | None]
    history: list[dict[str, Any]]
    batch_size: int
    world_size: int
    device: str
    amp: str
    n_train: int
    n_val: int
    images_per_s: float | None
    output_url: str
    checkpoint_url: str
    model_url: str
    result_url: str
    weights_sha256: str
    mlflow_run_id: str | None
    mlflow_experiment_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    #: Val IoU of the starting weights (``init_from``, before any step; None when training from
    #: scratch or without val pairs): what a fine-tune must beat.
    start_val_iou: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-serialisable dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        """Rebuild a result from ``to_dict()`` output (e.g. a ``result.json`` file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Devices, precision, loss, schedule
# ----------------------------------------------------------------------------------------------

def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX-512 BF16 or AMX), where bf16
    autocast is faster than float32; elsewhere bf16 is emulated and slower."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def resolve_device(config: TrainConfig, info: RankInfo) -> torch.device:
    """Pick this worker's device: ``cuda:<local_rank>`` when CUDA is wanted and present, else CPU.

    Raises ``RuntimeError`` when ``device="cuda"`` is asked for on a machine without CUDA."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch.cuda.is_available() is False: use device='auto' or 'cpu'")
    index = info.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Return ``(autocast dtype or None, use a GradScaler)`` for an ``amp`` mode on ``device``.

    ``"auto"``: fp16 with a gradient scaler on CUDA, bf16 on a CPU with native bf16, otherwise
    off. ``"bf16"``: bf16 (no scaler needed). ``"fp16"``: CUDA only (raises ``ValueError`` on the
    CPU). ``"off"``: float32.
    """
    if mode == "off":
        return None, False
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("amp='bf16' but this GPU has no bfloat16 support: use amp='fp16' or 'auto'")
        return torch.bfloat16, False
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; on the CPU use amp='bf16' or 'off'")
        return torch.float16, True
    if device.type == "cuda":
        return torch.float16, True
    return (torch.bfloat16, False) if cpu_supports_bf16() else (None, False)


def deep_supervision_loss(output: U2NetOutput, target: torch.Tensor, fused_weight: float = 1.0,
                          loss: str = "bce") -> torch.Tensor:
    """Return ``fused_weight · L(fused) + Σ L(side_k)`` over the six side maps (float32), where
    ``L`` is the loss ``loss`` (:func:`tasks.train.losses.segmentation_losses`; BCE by default).

    ``output`` holds logits; ``target`` is B×1×H×W in [0, 1]. Each term is a mean over pixels
    (the original U2-Net sums the seven BCE means with weight 1).
    """
    fused, *sides = segmentation_losses([output.fused, *output.sides], target, loss)
    total = fused_weight * fused
    for side in sides:
        total = total + side
    return total


def _warmup_cosine(steps: int, warmup: int, floor: float):
    """The factor of step ``k`` (0-based) of ``steps`` steps: linear up to 1 over ``warmup`` steps,
    then half a cosine from 1 down to ``floor``."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = min(1.0, (k - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _ramp_then_cosine(steps: int, warmup: int, floor: float, start: float):
    """:func:`_warmup_cosine` whose warm-up begins at ``start`` (step 0 keeps it) instead of near 0."""
    cosine = _warmup_cosine(steps, warmup, floor)
    return lambda k: start + (1.0 - start) * k / warmup if k < warmup else cosine(k)


def _warmup_steps(config: TrainConfig, steps_per_epoch: int, steps: int) -> int:
    """``warmup_epochs`` in steps, at most :data:`MAX_WARMUP_SHARE` of ``steps``."""
    return min(int(round(config.warmup_epochs * steps_per_epoch)), int(MAX_WARMUP_SHARE * steps))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int,
                    phase: tuple[int, float] | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """Return the per-iteration LR scheduler of ``config.schedule`` for ``config.epochs`` epochs.

    ``"cosine"``: linear warm-up over ``warmup_epochs`` (at most :data:`MAX_WARMUP_SHARE` of the run,
    so that a short fine-tune still decays) then half a cosine from ``lr`` down to
    ``min_lr_ratio · lr``; ``"onecycle"``: ``OneCycleLR`` with ``max_lr = lr``;
    ``"constant"``: ``lr`` throughout. Call ``scheduler.step()`` after every optimiser step.

    ``phase``: ``(step, factor)`` where a checkpoint resumed with more epochs than it planned stopped,
    and the factor of ``lr`` its schedule had reached there (:func:`resumed_phase`). The cosine
    schedule's steps from there are a phase of their own: a linear warm-up from that factor back to
    1 (at most :data:`MAX_WARMUP_SHARE` of the steps left), then the cosine down to the floor at the
    new end. The longer run's schedule from the start would jump at the resume instead, e.g. from
    the floor of a finished one-epoch run straight to ``lr``.
    """
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    floor = config.min_lr_ratio
    whole = _warmup_cosine(total, _warmup_steps(config, steps_per_epoch, total), floor)
    if phase is None or phase[0] >= total:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, whole)
    begin, start = phase
    left = total - begin
    later = _ramp_then_cosine(left, max(1, _warmup_steps(config, steps_per_epoch, left)), floor, start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: whole(step) if step < begin else later(step - begin))


def resumed_phase(checkpoint: dict, config: TrainConfig) -> tuple[int, float] | None:
    """The ``phase`` of :func:`build_scheduler` for resuming ``checkpoint`` under ``config``: where it
    stopped and the factor its rate had reached, when it planned fewer epochs; the phase it was
    already in, when it was itself an extended run; else None (and for the schedules other than
    cosine, which have no phases)."""
    if config.schedule != "cosine":
        return None
    epochs = config.epochs
    planned = int((checkpoint.get("config") or {}).get("epochs") or epochs)
    if planned < epochs:
        state = checkpoint["scheduler"]
        return int(state["last_epoch"]), float(state["_last_lr"][0]) / float(state["base_lrs"][0])
    phase = checkpoint.get("lr_phase")
    return (int(phase[0]), float(phase[1])) if phase else None


#: Training images whose statistics the batch-norms of published weights start from.
BN_CALIBRATION_IMAGES = 32


def _calibration_batches(samples: list, config: TrainConfig, batch: int = 8):
    """The first :data:`BN_CALIBRATION_IMAGES` training pairs, unflipped, as input batches."""
    data = SegmentationDataset(samples[:BN_CALIBRATION_IMAGES], config.input_size, train=False, resize=config.resize)
    for start in range(0, len(data), batch):
        yield torch.stack([data[i][0] for i in range(start, min(start + batch, len(data)))])


def _build(config: TrainConfig) -> U2Net:
    widths = config.model_config()
    return U2Net(widths) if widths is not None else build_model(config.model)


def _write_run_config(config: TrainConfig, storage_options: dict | None) -> None:
    """The run's settings as ``config.json`` in its folder."""
    storage.write_text(layout.model_config(config.output_url),
                       json.dumps(_public_config(config), indent=2, sort_keys=True), storage_options)


def _public_config(config: TrainConfig) -> dict[str, Any]:
    data = config.to_dict()
    for name in _PRIVATE_FIELDS:
        data.pop(name, None)
    return data


# ----------------------------------------------------------------------------------------------
# Tracking (rank 0 only)
# ----------------------------------------------------------------------------------------------

class _Tracker:
    """MLflow (and TensorBoard when installed) logging for rank 0; a no-op elsewhere."""

    def __init__(self, config: TrainConfig, enabled: bool, run_id_url: str) -> None:
        self.config = config
        self.enabled = enabled
        self.run_id_url = run_id_url
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._mlflow: Any = None
        self._tb: Any = None
        self._tb_dir: str | None = None

    def start(self, run_id: str | None, fresh: bool = False) -> None:
        """Start a new MLflow run, or reopen ``run_id`` (a resumed run); store the id for resumes.
        Without ``run_id`` the run recorded in the output folder is reopened, unless ``fresh``."""
        if not self.enabled:
            return
        self._start_tensorboard()
        if not self.config.mlflow_enabled:
            return
        import mlflow

        self._mlflow = mlflow
        config = self.config
        if config.mlflow_tracking_uri:
            mlflow.set_tracking_uri(config.mlflow_tracking_uri)
        if run_id is None and not fresh:  # a run that died before its first checkpoint: continue its MLflow run
            run_id = self.recorded_run_id()
        if run_id is not None:
            try:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=config.log_system_metrics)
            except mlflow.exceptions.MlflowException as exc:
                raise RuntimeError(f"cannot reopen MLflow run {run_id} recorded in {config.output_url} "
                                   f"on {mlflow.get_tracking_uri()}: {exc}; point mlflow_tracking_uri at the "
                                   "store the run was started in, or use a new output_url") from exc
        else:
            experiment = mlflow.get_experiment_by_name(config.mlflow_experiment)
            if experiment is None:
                experiment_id = mlflow.create_experiment(config.mlflow_experiment,
                                                         artifact_location=self._artifact_location())
            else:
                experiment_id = experiment.experiment_id
            run = mlflow.start_run(experiment_id=experiment_id, run_name=config.mlflow_run_name,
                                   log_system_metrics=config.log_system_metrics)
            storage.write_text(self.run_id_url, run.info.run_id, config.storage_options)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id

    def recorded_run_id(self) -> str | None:
        """The MLflow run id the output folder records (``mlflow_run_id``), or None."""
        if not storage.exists(self.run_id_url, self.config.storage_options):
            return None
        return storage.read_bytes(self.run_id_url, self.config.storage_options).decode().strip() or None

    def _artifact_location(self) -> str | None:
        from tasks.registry import default_artifact_location

        return self.config.mlflow_artifact_location or default_artifact_location(self._mlflow.get_tracking_uri())

    def _start_tensorboard(self) -> None:
        if not self.config.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: TensorBoard event files are not written")
            return
        fs, path = storage.filesystem(self.config.output_url, self.config.storage_options)
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(fs, LocalFileSystem):
            self._tb_dir = os.path.join(path, "tensorboard")
        else:  # write locally, upload after each epoch
            from tasks.train.data import default_cache_dir

            digest = hashlib.sha256(self.config.output_url.encode()).hexdigest()[:16]
            self._tb_dir = os.path.join(self.config.cache_dir or default_cache_dir(), "tensorboard", digest)
        self._tb = SummaryWriter(log_dir=self._tb_dir)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log run parameters (flat ``name → value``; values longer than MLflow allows are cut)."""
        if self._mlflow is None:
            return
        self._mlflow.log_params({k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                                 for k, v in params.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the MLflow run (they can change; params cannot)."""
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)

    def log_dataset(self, dataset_url: str, storage_options: dict | None) -> None:
        """Log the dataset version as the run's training input (``mlflow.log_input``): its name,
        its location and a digest of its manifest, so that a run says which data made it. A
        manifest MLflow cannot describe is logged as a warning, never as a failed run."""
        if self._mlflow is None:
            return
        from tasks.core.manifest import read_table

        try:
            manifest = read_table(layout.manifest(dataset_url), storage_options)
            name = posixpath.basename(dataset_url.rstrip("/")) or dataset_url
            with warnings.catch_warnings():  # MLflow's schema hints about integer columns
                warnings.simplefilter("ignore", UserWarning)
                dataset = self._mlflow.data.from_pandas(manifest, source=dataset_url, name=name)
            self._mlflow.log_input(dataset, context="training")
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not fail a training run
            log.warning("could not log the dataset %s as the run's input: %s", dataset_url, exc)

    def has_params(self) -> bool:
        """True when the run already holds parameters (it was started before a crash)."""
        if self._mlflow is None or self.run_id is None:
            return False
        return bool(self._mlflow.tracking.MlflowClient().get_run(self.run_id).data.params)

    def logged_steps(self, metric: str = "train_loss") -> set[int]:
        """Steps of ``metric`` already in the run (to skip epochs logged before a crash)."""
        if self._mlflow is None or self.run_id is None:
            return set()
        client = self._mlflow.tracking.MlflowClient()
        return {m.step for m in client.get_metric_history(self.run_id, metric)}

    def log_start(self, val_iou: float) -> None:
        """Log the starting weights' val IoU (``start_val_iou``, at step 0)."""
        if self._mlflow is not None:
            self._mlflow.log_metrics({"start_val_iou": val_iou}, step=0)

    def log_epoch(self, metrics: EpochMetrics) -> None:
        """Log one epoch's metrics at ``step = epoch`` to MLflow and TensorBoard."""
        if self._mlflow is not None:
            self._mlflow.log_metrics(metrics.mlflow_metrics(), step=metrics.epoch)
        if self._tb is not None:
            for name, value in metrics.mlflow_metrics().items():
                self._tb.add_scalar(name, value, metrics.epoch)
            self._tb.flush()
            self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        fs, _ = storage.filesystem(self.config.output_url, self.config.storage_options)
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(fs, LocalFileSystem) or self._tb_dir is None:
            return
        for name in sorted(os.listdir(self._tb_dir)):
            with open(os.path.join(self._tb_dir, name), "rb") as handle:
                storage.write_bytes(storage.join(self.config.output_url, "tensorboard", name), handle.read(),
                                    self.config.storage_options)

    def finish(self, status: str, tags: dict[str, str] | None = None) -> None:
        """Set ``tags`` and end the MLflow run with ``status`` (FINISHED or FAILED)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None and self._mlflow.active_run() is not None:
            if tags:
                self._mlflow.set_tags(tags)
            self._mlflow.end_run(status=status)


# ----------------------------------------------------------------------------------------------
# Epochs
# ----------------------------------------------------------------------------------------------

def _epoch_bar(epoch: int, epochs: int, images: int, show: bool) -> tqdm:
    """A progress bar over one epoch's images (all workers' together, counted on the main rank), whose
    rate is the training img/s; on a terminal (or through ``bgremoval train``'s pipe to one:
    ``BGREMOVAL_PROGRESS_REDRAW=1``) it redraws, in a log file (an Airflow task) it writes a line every
    30 seconds at the most."""
    redraw = sys.stderr.isatty() or os.environ.get("BGREMOVAL_PROGRESS_REDRAW") == "1"
    return tqdm(total=images, desc=f"epoch {epoch}/{epochs}", unit="img", disable=not show, file=sys.stderr,
                mininterval=0.5 if redraw else 30.0, dynamic_ncols=True)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
              config: TrainConfig) -> tuple[float, float, int]:
    """Return ``(sum of per-image losses, sum of per-image IoUs, images)`` over this worker's shard."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    iou_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for images, masks in loader:
        images = _to_device(images, device, config.channels_last)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = model(images)
        loss_sum += deep_supervision_loss(output, masks, config.fused_weight, config.loss).double() * images.shape[0]
        predicted = output.fused.float() > 0  # sigmoid(x) > 0.5
        truth = masks > 0.5
        intersection = (predicted & truth).flatten(1).sum(1).double()
        union = (predicted | truth).flatten(1).sum(1).double()
        iou_sum += torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union)).sum()
        count += images.shape[0]
    return float(loss_sum), float(iou_sum), count


def settings_in(saved: dict[str, Any], output_url: str) -> dict[str, Any]:
    """``saved`` (the settings a checkpoint was written with) as they read in the run folder
    ``output_url``: the folder, and the paths inside it (the staged starting weights), moved with it.
    A run folder that was moved or copied resumes; its data set must still be where it was."""
    before = str(saved.get("output_url") or "").rstrip("/")
    if not before:
        return dict(saved)
    now = output_url.rstrip("/")

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value.rstrip("/") == before or value.startswith(before + "/")):
            return now + value.rstrip("/")[len(before):]
        return value

    return {key: moved(value) for key, value in saved.items()}


def _copied_from(checkpoint: dict | None, config: TrainConfig) -> str | None:
    """The run folder ``config``'s was copied from, when the checkpoint was written in another folder
    that still holds its own checkpoint (a moved folder goes on in its MLflow run, a copy in a new one)."""
    before = str(((checkpoint or {}).get("config") or {}).get("output_url") or "")
    if not before or storage.place_key(before) == storage.place_key(config.output_url):
        return None
    try:
        return before if storage.exists(layout.checkpoint(before), config.storage_options) else None
    except Exception:  # noqa: BLE001 - another store, unreachable from here: not a copy we can see
        return None


def resume_conflicts(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The settings ``config`` changes from ``saved`` (those a checkpoint, or its run's ``config.json``,
    was written with, read in ``config``'s run folder: :func:`settings_in`), ``"name: before → now"``
    each; resuming needs none. Those in :data:`RESUME_FREE_FIELDS` (epochs, logging, workers) may change."""
    saved = settings_in(saved, config.output_url)
    now = _public_config(config)
    return [f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in sorted(now)
            if k not in RESUME_FREE_FIELDS and saved.get(k) != now.get(k)]


def _check_resumable(checkpoint: dict[str, Any], config: TrainConfig, url: str) -> None:
    changed = resume_conflicts(checkpoint.get("config", {}), config)
    if changed:
        raise ValueError(f"the checkpoint at {url} was written with other settings ({'; '.join(changed)}): "
                         "restore them to resume, or use a new output_url to start a new run")


def train(config: TrainConfig, rank_info: RankInfo | None = None) -> TrainResult:
    """Train (or resume training) one model as one worker of a data-parallel run.

    Args:
        config: the run's :class:`~tasks.train.config.TrainConfig` (the same on every worker).
        rank_info: this worker's rank, world size and collectives (None: read ``RANK``/
            ``WORLD_SIZE``/``LOCAL_RANK`` from the environment; one process is rank 0 of 1). Under
            ``torchrun`` the process group must be initialised first (``tasks.train.ddp`` does).

    Returns the :class:`TrainResult` (the same on every worker). Writes the outputs listed in the
    module docstring. Raises ``FileNotFoundError``/``ValueError`` with the reason when the dataset
    has no training rows, the checkpoint does not match the config, or a setting is impossible
    on this device.
    """
    info = rank_info or RankInfo.from_env()
    device = resolve_device(config, info)
    if device.type == "cpu":
        keep_freed_memory()  # 1.27x the images/s of 2 workers at 320 px (benchmarks/README.md)
    coll: Collectives = default_collectives(info, device)
    amp_dtype, use_scaler = resolve_amp(config.amp, device)
    opts = config.storage_options or None
    out = config.output_url
    checkpoint_url = layout.checkpoint(out)
    model_url = layout.model_weights(out)
    result_url = layout.train_result(out)

    # Data: local rank 0 fills the machine's cache, the others then find every file present.
    def _prepare() -> tuple[list, list]:
        return (prepare_split(config.dataset_url, config.train_split, config.cache_dir, opts, config.use_augmented),
                prepare_split(config.dataset_url, config.val_split, config.cache_dir, opts, False))

    if info.local_rank == 0:
        train_samples, val_samples = _prepare()
    coll.barrier()
    if info.local_rank != 0:
        train_samples, val_samples = _prepare()
    if not train_samples:
        raise ValueError(f"no training pairs: {config.dataset_url}/manifest.parquet has no rows with "
                         f"status 'ok' and split {config.train_split!r}")
    train_set = SegmentationDataset(train_samples, config.input_size, train=True, resize=config.resize)
    val_set = SegmentationDataset(val_samples, config.input_size, train=False, resize=config.resize)
    sampler = ClusterBalancedDistributedSampler(train_set.clusters, info.world_size, info.rank, config.seed)

    # Model: the same initial weights on every worker (DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    model = _build(config)
    checkpoint = load_checkpoint(checkpoint_url, opts)
    if checkpoint is not None:
        _check_resumable(checkpoint, config, checkpoint_url)
        model.load_state_dict(checkpoint["model"])
    elif config.init_from:
        model.load_state_dict(load_state_dict_from_url(config.init_from, opts))
        if has_identity_batchnorm(model):
            # Published weights come with batch-norm folded away; every worker calibrates on the
            # same first images (in their validation form), so all start from the same weights.
            seen = unfold_batchnorm(model, _calibration_batches(train_samples, config))
            log.info("batch-norm statistics of the published weights calibrated on %d training images", seen)
    model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)

    if checkpoint is not None:
        batch_size = int(checkpoint["batch_size"])
    elif config.batch_size == "auto":
        probe = training_step_probe(model, config.input_size, device, amp_dtype, config.channels_last, config.lr)
        found = find_batch_size(probe, start=config.batch_size_start, max_size=sampler.num_samples)
        del probe
        batch_size = coll.all_reduce_min(found)
    else:
        batch_size = int(config.batch_size)
    batch_size = max(1, min(batch_size, sampler.num_samples))

    # Augmentation randomness differs per worker (the data differ anyway).
    random.seed(config.seed * 1009 + info.rank)
    np.random.seed((config.seed * 1009 + info.rank) % 2**32)
    torch.manual_seed(config.seed * 1009 + info.rank + 1)

    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=config.num_workers > 0)
    val_loader = DataLoader(val_set, batch_size=batch_size,
                            sampler=ShardSampler(len(val_set), info.world_size, info.rank),
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

    net = coll.wrap_model(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    phase = resumed_phase(checkpoint, config) if checkpoint is not None else None
    scheduler = build_scheduler(optimizer, config, steps_per_epoch, phase)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start_epoch, history, run_id = 1, [], None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
            scheduler.total_steps = max(scheduler.total_steps, config.epochs * steps_per_epoch)
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = int(checkpoint["epoch"]) + 1
        history = list(checkpoint.get("history", []))
        run_id = checkpoint.get("mlflow_run_id")
        rng = checkpoint.get("rng") or []
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        else:
            log.warning("checkpoint RNG states are for %d workers, this run has %d: not restored",
                        len(rng), info.world_size)
        log.info("resuming from %s at epoch %d", checkpoint_url, start_epoch)
    # Every worker must agree on where it starts (they all read the same checkpoint).
    if coll.all_reduce_min(start_epoch) != start_epoch or coll.all_reduce_min(-start_epoch) != -start_epoch:
        raise RuntimeError(f"workers disagree on the resume epoch: the checkpoint at {checkpoint_url} "
                           "changed while they started; restart the run")

    copied_from = _copied_from(checkpoint, config)
    tracker = _Tracker(config, info.is_main, storage.join(out, "mlflow_run_id"))
    status = "FAILED"
    try:
        # A copy goes on in a run of its own: the one its folder records when it started one before its first
        # checkpoint, else a new one (the folder still records the original's).
        tracker.start(None if copied_from else run_id,
                      fresh=copied_from is not None and tracker.recorded_run_id() == run_id)
        if info.is_main:
            if (checkpoint is None or copied_from) and not tracker.has_params():
                if copied_from:  # a copy goes on in a run of its own; the original's run is left as it is
                    tracker.set_tags({"copied_from": copied_from, "copied_from_run": str(run_id)})
                _write_run_config(config, opts)
                params = {k: v for k, v in _public_config(config).items() if v is not None}
                params.update(batch_size_per_worker=batch_size, world_size=info.world_size, device=device.type,
                              amp_dtype=str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
                              steps_per_epoch=steps_per_epoch, n_train=len(train_set), n_val=len(val_set),
                              n_parameters=count_parameters(model))
                tracker.log_params(params)
                tracker.log_dataset(config.dataset_url, opts)
            elif checkpoint is not None and checkpoint.get("config", {}).get("epochs", config.epochs) != config.epochs:
                # A finished run extended: MLflow's params are write-once (``epochs`` keeps the first plan),
                # so the plan now is a tag; config.json says what the run trains to.
                tracker.set_tags({"epochs_planned": str(config.epochs)})
                _write_run_config(config, opts)
            # Epochs checkpointed but not logged (a crash between the two) are logged now, once.
            logged = tracker.logged_steps()
            for entry in history:
                if entry["epoch"] not in logged:
                    tracker.log_epoch(EpochMetrics(**entry))

        start_val_iou = checkpoint.get("start_val_iou") if checkpoint is not None else None
        if checkpoint is None and config.init_from:
            _, start_iou, start_count = _validate(model, val_loader, device, amp_dtype, config)
            total = coll.all_reduce_sum([start_iou, start_count])
            start_val_iou = total[0] / total[1] if total[1] else None
            if info.is_main and start_val_iou is not None:
                log.info("val IoU of the starting weights: %.4f", start_val_iou)
                tracker.log_start(start_val_iou)

        epochs_run = 0
        for epoch in range(start_epoch, config.epochs + 1):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            net.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            bar = _epoch_bar(epoch, config.epochs, steps_per_epoch * batch_size * info.world_size, info.is_main)
            data_wait, asked_at = 0.0, time.perf_counter()
            for step, (images, masks) in enumerate(loader):
                data_wait += time.perf_counter() - asked_at
                if step >= steps_per_epoch:
                    break
                images = _to_device(images, device, config.channels_last)
                masks = masks.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    output = net(images)
                loss = deep_supervision_loss(output, masks, config.fused_weight, config.loss)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch} step {step}: lower lr, "
                                             "set grad_clip, or use amp='off'")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach().double() * images.shape[0]
                seen += images.shape[0]
                bar.update(images.shape[0] * info.world_size)
                if bar.n >= bar.total or step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", data_wait=f"{data_wait / (time.perf_counter() - started):.0%}",
                                    refresh=False)
                asked_at = time.perf_counter()
            bar.close()
            coll.broadcast_buffers(model)  # BatchNorm statistics: rank 0's everywhere
            val_loss, val_iou, val_count = _validate(model, val_loader, device, amp_dtype, config)
            total = coll.all_reduce_sum([float(loss_sum), seen, val_loss, val_iou, val_count, data_wait])
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=total[0] / max(total[1], 1),
                val_loss=total[2] / total[4] if total[4] else None,
                val_iou=total[3] / total[4] if total[4] else None,
                lr=float(optimizer.param_groups[0]["lr"]),
                images=int(total[1]),
                seconds=time.perf_counter() - started,
                data_wait_s=total[5] / info.world_size,
            )
            history.append(dataclasses.asdict(metrics))
            rng_states = coll.all_gather_object(capture_rng_state())
            if info.is_main:
                save_checkpoint(checkpoint_url, {
                    "epoch": epoch, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if use_scaler else {}, "sampler_epoch": sampler.epoch,
                    "batch_size": batch_size, "rng": rng_states, "history": history,
                    "mlflow_run_id": tracker.run_id, "config": _public_config(config),
                    "world_size": info.world_size, "start_val_iou": start_val_iou,
                    "lr_phase": list(phase) if phase else None,
                }, opts)
                tracker.log_epoch(metrics)
                log.info("epoch %d/%d: train loss %.4f, val loss %s, val IoU %s, lr %.2e, %.1f img/s, "
                         "%.0f%% waiting for data", epoch, config.epochs, metrics.train_loss, metrics.val_loss,
                         metrics.val_iou, metrics.lr, metrics.images_per_s, 100 * metrics.data_wait_share)
            coll.barrier()
            epochs_run += 1
            exit_if_asked(epoch, info.rank)

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        digest = state_dict_sha256(state)
        storage.write_text(storage.join(out, f"weights-rank{info.rank}.sha256"), digest + "\n", opts)
        run_id = coll.broadcast_object(tracker.run_id)
        experiment_id = coll.broadcast_object(tracker.experiment_id)
        last = history[-1] if history else {}
        this_call = history[len(history) - epochs_run:] if epochs_run else []
        seconds = sum(h["seconds"] for h in this_call)
        result = TrainResult(
            model=config.model, epochs=config.epochs, epochs_completed=len(history), epochs_run=epochs_run,
            start_epoch=start_epoch, resumed=checkpoint is not None,
            metrics={k: last.get(k) for k in ("train_loss", "val_loss", "val_iou", "lr")},
            history=history, batch_size=batch_size, world_size=info.world_size, device=str(device),
            amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off", n_train=len(train_set),
            n_val=len(val_set), images_per_s=(sum(h["images"] for h in this_call) / seconds) if seconds else None,
            output_url=out, checkpoint_url=checkpoint_url, model_url=model_url, result_url=result_url,
            weights_sha256=digest, mlflow_run_id=run_id, mlflow_experiment_id=experiment_id,
            config=_public_config(config), start_val_iou=start_val_iou,
        )
        if info.is_main:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            storage.write_bytes(model_url, buffer.getvalue(), opts)
            storage.write_text(result_url, json.dumps(result.to_dict(), indent=2), opts)
        coll.barrier()
        status = "FINISHED"
        tracker.finish(status, {"model_url": model_url, "checkpoint_url": checkpoint_url,
                                "weights_sha256": digest, "epochs_completed": str(len(history))})
        return result
    finally:
        if status != "FINISHED":
            tracker.finish(status)

