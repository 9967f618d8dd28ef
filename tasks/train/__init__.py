"""Training: one loop (:func:`train`) and the ways to run it on many workers.

* :mod:`tasks.train.config` — :class:`TrainConfig`, the JSON-serialisable run settings;
* :mod:`tasks.train.data` — the local pair cache, :class:`SegmentationDataset` and the
  :class:`ClusterBalancedDistributedSampler`;
* :mod:`tasks.train.loop` — :func:`train` and :class:`TrainResult`;
* :mod:`tasks.train.batch_size` — the batch-size finder behind ``batch_size="auto"``;
* :mod:`tasks.train.checkpoint` — atomic checkpoints, weights loading, state hashes;
* :mod:`tasks.train.collectives` — :class:`RankInfo` and the collectives a backend provides;
* :mod:`tasks.train.ddp` — the ``torch.distributed`` backend (``torchrun``) and :func:`launch_local`.
"""

from tasks.train.batch_size import find_batch_size, is_out_of_memory, training_step_probe
from tasks.train.collectives import Collectives, LocalCollectives, RankInfo, TorchCollectives
from tasks.train.config import TrainConfig
from tasks.train.data import ClusterBalancedDistributedSampler, Sample, SegmentationDataset, prepare_split
from tasks.train.loop import EpochMetrics, TrainResult, deep_supervision_loss, train

__all__ = [
    "ClusterBalancedDistributedSampler",
    "Collectives",
    "EpochMetrics",
    "LocalCollectives",
    "RankInfo",
    "Sample",
    "SegmentationDataset",
    "TorchCollectives",
    "TrainConfig",
    "TrainResult",
    "deep_supervision_loss",
    "find_batch_size",
    "is_out_of_memory",
    "prepare_split",
    "train",
    "training_step_probe",
]
