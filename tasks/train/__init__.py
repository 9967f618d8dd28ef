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
