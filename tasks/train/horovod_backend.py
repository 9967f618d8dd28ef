"""The Horovod backend: :func:`~tasks.train.loop.train` under ``horovodrun``, one process per worker.

Worker entry point (what ``horovodrun`` starts on every process)::

    horovodrun -np 2 --gloo -H localhost:2 python -m tasks.train.horovod_backend --config config.json

reads the :class:`~tasks.train.config.TrainConfig` (a JSON file or URL, or ``--config-json``
text), calls ``hvd.init()``, and trains with :class:`HorovodCollectives`: rank 0's weights are
broadcast once, and every gradient is averaged over the workers by ``hvd.allreduce`` while
``backward()`` runs (hooks on the parameters), so the training loop and its optimiser stay exactly
those of a single process. :func:`launch_local` runs that on this machine and returns rank 0's
result.

Horovod is not a dependency of the project (PyPI has no wheel of it): ``scripts/install-horovod.sh``
builds and installs it. It is imported only when used, so this module imports without it. The
build that script makes has CPU (Gloo) collectives only: train with ``device="cpu"``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.train.collectives import Collectives, RankInfo
from tasks.train.config import COLLECTIVE_TIMEOUT_S, TrainConfig
from tasks.train.ddp import run_launcher, worker_main
from tasks.train.loop import TrainResult, train

__all__ = ["HorovodCollectives", "horovodrun_executable", "import_horovod", "launch_local", "main", "run_worker"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "run scripts/install-horovod.sh (it builds Horovod 0.28.1 for this venv's torch)"


def import_horovod() -> Any:
    """Return the ``horovod.torch`` module.

    Raises ``ImportError`` that says how to install it when Horovod (or its torch extension, built
    against another torch) cannot be imported."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(f"Horovod's PyTorch support is not importable ({exc}): {_INSTALL_HINT}") from exc
    return hvd


def _dense_view(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return ``(contiguous tensor sharing or copying tensor's values, whether it is a copy)``.

    Horovod only accepts contiguous tensors; a channels-last weight or gradient is dense but not
    contiguous, and a permutation of its dimensions is a contiguous view of the same memory (every
    worker has the same layout, so element-wise reductions and broadcasts on it are exact)."""
    if tensor.is_contiguous():
        return tensor, False
    order = sorted(range(tensor.dim()), key=lambda d: tensor.stride(d), reverse=True)
    view = tensor.permute(order)
    if view.is_contiguous():
        return view, False
    return tensor.contiguous(), True


class HorovodCollectives(Collectives):
    """Collective operations through Horovod (call ``hvd.init()`` first; :func:`run_worker` does).

    :meth:`wrap_model` broadcasts rank 0's parameters and buffers, then averages every gradient
    over the workers during ``backward()``: a post-accumulate-grad hook on each parameter starts
    ``hvd.allreduce_async_(grad, op=hvd.Average)`` as soon as that gradient is ready (overlapping
    communication with the rest of the backward pass), and a callback queued on the autograd
    engine waits for all of them before ``backward()`` returns. The optimiser is the loop's own.
    Every parameter must receive a gradient in every step (true for U2-Net), otherwise the
    workers would wait on each other.
    """

    def __init__(self) -> None:
        self.hvd = import_horovod()
        if not self.hvd.is_initialized():
            raise RuntimeError("HorovodCollectives needs hvd.init() first (tasks.train.horovod_backend.run_worker "
                               "does it)")
        self._pending: list[tuple[Any, torch.Tensor, torch.Tensor | None]] = []
        self._callback_queued = False
        self._hooks: list[Any] = []

    # -- model -----------------------------------------------------------------------------------

    def _broadcast_tensors(self, named: list[tuple[str, torch.Tensor]], prefix: str) -> None:
        handles = []
        for name, tensor in named:
            dense, copied = _dense_view(tensor.data)
            handle = self.hvd.broadcast_async_(dense, root_rank=0, name=f"{prefix}.{name}")
            handles.append((handle, tensor, dense if copied else None))
        for handle, tensor, copy in handles:
            self.hvd.synchronize(handle)
            if copy is not None:
                tensor.data.copy_(copy)

    def wrap_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Give every worker rank 0's weights and buffers, register the gradient-averaging hooks,
        and return ``model`` itself.

        Raises ``RuntimeError`` for a CUDA device when this Horovod build has no GPU support."""
        if device.type == "cuda" and not self.hvd.cuda_built():
            raise RuntimeError("this Horovod build has CPU (Gloo) collectives only: train with device='cpu', "
                               "or rebuild Horovod with HOROVOD_GPU_OPERATIONS=NCCL")
        self._broadcast_tensors(sorted(model.state_dict().items()), "bgremoval.init")
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for index, (name, param) in enumerate(model.named_parameters()):
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(
                    self._make_hook(f"bgremoval.grad.{index}.{name}")))
        return model

    def _make_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            dense, copied = _dense_view(param.grad)
            handle = self.hvd.allreduce_async_(dense, name=name, op=self.hvd.Average)
            self._pending.append((handle, param, dense if copied else None))
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

        return hook

    def _finish_backward(self) -> None:
        """Wait for this backward pass's gradient reductions (runs as ``backward()`` ends)."""
        pending, self._pending, self._callback_queued = self._pending, [], False
        for handle, param, copy in pending:
            self.hvd.synchronize(handle)
            if copy is not None:
                param.grad.copy_(copy)

    # -- metrics and small objects ---------------------------------------------------------------

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Return the element-wise sum of ``values`` over all workers (float64)."""
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name="bgremoval.sum").tolist()

    def all_reduce_min(self, value: int) -> int:
        """Return the smallest ``value`` over all workers."""
        tensor = torch.tensor([int(value)], dtype=torch.int64)
        return int(self.hvd.allreduce(tensor, op=self.hvd.Min, name="bgremoval.min").item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Return every worker's ``obj``, indexed by rank."""
        return list(self.hvd.allgather_object(obj, name="bgremoval.gather"))

    def broadcast_object(self, obj: Any) -> Any:
        """Return rank 0's ``obj`` on every worker."""
        return self.hvd.broadcast_object(obj, root_rank=0, name="bgremoval.object")

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into every worker's ``model``."""
        module = model.module if hasattr(model, "module") else model
        self._broadcast_tensors(list(module.named_buffers()), "bgremoval.buffer")

    def barrier(self) -> None:
        """Wait until every worker has reached this point."""
        self.hvd.barrier()


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------

def run_worker(config: TrainConfig, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TrainResult:
    """Train as one ``horovodrun`` worker: ``hvd.init()``, :func:`~tasks.train.loop.train` with
    :class:`HorovodCollectives`, and always ``hvd.shutdown()``.

    ``timeout_s``: a worker whose collective waits this long for its peers shuts Horovod down
    (``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``, unless already set) instead of hanging.
    Returns this worker's :class:`TrainResult`. Raises ``ImportError`` when Horovod is missing.
    """
    hvd = import_horovod()
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(max(timeout_s, 61))))
    hvd.init()
    try:
        info = RankInfo(rank=hvd.rank(), world_size=hvd.size(), local_rank=hvd.local_rank(),
                        collectives=HorovodCollectives())
        return train(config, info)
    finally:
        hvd.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Command line of one ``horovodrun`` worker: ``--config FILE_OR_URL`` or ``--config-json TEXT``.

    Returns 0 on success (rank 0 prints the result JSON on its last line of stdout)."""
    return worker_main("python -m tasks.train.horovod_backend", __doc__.splitlines()[0], run_worker,
                       ("HOROVOD_RANK", "RANK"), argv)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def horovodrun_executable() -> str:
    """Return the path of the ``horovodrun`` script next to this interpreter (the venv's).

    Raises ``FileNotFoundError`` that says how to install Horovod when it is not there."""
    candidate = Path(sys.executable).with_name("horovodrun")
    if not candidate.exists():
        raise FileNotFoundError(f"no horovodrun next to {sys.executable}: {_INSTALL_HINT}")
    return str(candidate)


def launch_local(config: TrainConfig, nproc: int, timeout_s: float | None = None,
                 log_path: str | None = None, env: dict[str, str] | None = None) -> TrainResult:
    """Run ``horovodrun -np nproc --gloo -H localhost:nproc python -m tasks.train.horovod_backend``
    here and wait (the same contract as :func:`tasks.train.ddp.launch_local`).

    Args:
        config: the run's config (written to a temporary JSON file for the workers).
        nproc: worker processes on this machine.
        timeout_s: kill the run after this many seconds (None: no limit).
        log_path: where the workers' combined output goes (default: a temporary file, deleted
            after a successful run).
        env: extra environment variables for the workers.

    On the CPU each worker gets ``OMP_NUM_THREADS=1`` (unless ``env`` sets it). Returns rank 0's
    :class:`TrainResult`, read from ``<output_url>/result.json``. Raises ``FileNotFoundError``
    when Horovod is not installed, and ``RuntimeError`` with the exit status and the tail of the
    log when horovodrun fails (or times out).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    executable = horovodrun_executable()
    import_horovod()  # fail here, with the install hint, rather than in every worker

    def command(config_path: str) -> list[str]:
        return [executable, "-np", str(nproc), "--gloo", "-H", f"localhost:{nproc}",
                sys.executable, "-m", "tasks.train.horovod_backend", "--config", config_path]

    return run_launcher("horovodrun", nproc, command, config, timeout_s, log_path, env)


if __name__ == "__main__":
    sys.exit(main())
