"""Which worker this is, and the few collective operations the training loop needs.

The loop (:func:`tasks.train.loop.train`) never calls ``torch.distributed`` (or Horovod) itself:
it asks a :class:`Collectives` object to wrap the model, sum metrics over workers, share small
objects and wait at barriers. :class:`LocalCollectives` is the single-process version,
:class:`TorchCollectives` the ``torch.distributed`` one (DistributedDataParallel); another
backend (Horovod, Spark's TorchDistributor) passes its own subclass in :class:`RankInfo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Collectives", "LocalCollectives", "RankInfo", "TorchCollectives", "default_collectives"]


class Collectives:
    """Collective operations over the workers of one run; this base class is the one-process case.

    Subclasses override every method; all workers must call each method in the same order.
    """

    def wrap_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Return the module the training step calls (e.g. a DDP wrapper of ``model``); gradients
        must be averaged over workers by the time ``backward()`` returns."""
        return model

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Return the element-wise sum of ``values`` over all workers."""
        return [float(v) for v in values]

    def all_reduce_min(self, value: int) -> int:
        """Return the smallest ``value`` over all workers."""
        return int(value)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Return the list of every worker's ``obj``, indexed by rank (picklable objects)."""
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """Return rank 0's ``obj`` on every worker."""
        return obj

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into every worker's ``model``."""

    def barrier(self) -> None:
        """Wait until every worker has reached this point."""


class LocalCollectives(Collectives):
    """The single-process case: every operation is the identity."""


class TorchCollectives(Collectives):
    """``torch.distributed`` collectives over an initialised default process group.

    ``device`` is where tensors for communication live: the process's CUDA device under NCCL,
    the CPU under gloo. ``wrap_model`` returns a :class:`DistributedDataParallel` module (buffers
    broadcast from rank 0 before each forward pass).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchCollectives needs an initialised torch.distributed process group: "
                               "call torch.distributed.init_process_group first (tasks.train.ddp does)")
        self.device = torch.device(device)

    def wrap_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def all_reduce_min(self, value: int) -> int:
        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_buffers(self, model: nn.Module) -> None:
        module = model.module if hasattr(model, "module") else model
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()


@dataclass
class RankInfo:
    """Who this worker is: global ``rank``, ``world_size``, ``local_rank`` on its machine, and
    the ``collectives`` to use (None: :func:`default_collectives` decides)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    collectives: Collectives | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"invalid rank {self.rank} / world size {self.world_size} / "
                             f"local rank {self.local_rank}")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the worker that logs and writes the shared outputs."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RankInfo:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as set by torchrun, Horovod's
        launcher or TorchDistributor); a plain process is rank 0 of 1."""
        env = os.environ if environ is None else environ
        return cls(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                   local_rank=int(env.get("LOCAL_RANK", 0)))


def default_collectives(info: RankInfo, device: torch.device) -> Collectives:
    """Return ``info.collectives`` if set; else :class:`TorchCollectives` when a process group of
    ``info.world_size`` > 1 workers is initialised, :class:`LocalCollectives` for one worker.

    Raises ``RuntimeError`` when ``world_size`` > 1 but no process group exists (each worker
    would silently train alone)."""
    if info.collectives is not None:
        return info.collectives
    if info.world_size == 1:
        return LocalCollectives()
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != info.world_size:
            raise RuntimeError(f"the process group has {dist.get_world_size()} workers but RankInfo says "
                               f"{info.world_size}")
        comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return TorchCollectives(comm_device)
    raise RuntimeError(f"world_size is {info.world_size} but torch.distributed is not initialised: "
                       "run under tasks.train.ddp (torchrun) or pass RankInfo(collectives=...)")
