"""The ``torch.distributed`` backend: :func:`train` under ``torchrun``, one process per worker.

Worker entry point (what ``torchrun`` starts on every process)::

    torchrun --standalone --nproc_per_node 2 -m tasks.train.ddp --config config.json

reads the :class:`~tasks.train.config.TrainConfig` (a JSON file, or ``--config-json`` text),
initialises the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``…; NCCL when the run uses CUDA, gloo on the CPU), trains with the model wrapped in
DistributedDataParallel (:class:`~tasks.train.collectives.TorchCollectives`), and destroys the
group. :func:`launch_local` runs exactly that on this machine and returns rank 0's result.
"""

from __future__ import annotations

from collections.abc import Callable

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.core import layout, storage
from tasks.registry import absolute_tracking_uri
from tasks.train.collectives import RankInfo, TorchCollectives
from tasks.train.config import COLLECTIVE_TIMEOUT_S, TrainConfig
from tasks.train.loop import TrainResult, resolve_device, train

__all__ = ["launch_local", "main", "run_worker", "torchrun_executable"]

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _uses_cuda(config: TrainConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def run_worker(config: TrainConfig, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TrainResult:
    """Train as one ``torchrun`` worker: initialise the process group from the environment, run
    :func:`~tasks.train.loop.train` with DDP collectives, and always destroy the group.

    ``timeout_s`` bounds every collective, so a worker whose peer died fails instead of hanging.
    Returns this worker's :class:`TrainResult`. Raises ``RuntimeError`` outside ``torchrun``
    (no ``RANK``/``WORLD_SIZE`` in the environment).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("tasks.train.ddp runs under torchrun (RANK/WORLD_SIZE unset): use "
                           "`torchrun --nproc_per_node N -m tasks.train.ddp --config ...` or launch_local()")
    info = RankInfo.from_env()
    device = resolve_device(config, info)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        info.collectives = TorchCollectives(device if backend == "nccl" else "cpu")
        return train(config, info)
    finally:
        dist.destroy_process_group()


def worker_main(prog: str, description: str, run: Callable[[TrainConfig, float], TrainResult],
                rank_variables: tuple[str, ...], argv: list[str] | None = None) -> int:
    """The command line every backend's worker shares: ``--config FILE_OR_URL`` or ``--config-json``.

    Takes the program name and description for ``--help``, the backend's ``run(config, timeout)``,
    and the environment variables that hold this worker's rank (the first one set wins). Returns 0
    on success; rank 0 prints the result JSON on its last line of stdout.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="path or URL of a TrainConfig JSON file")
    source.add_argument("--config-json", help="the TrainConfig as JSON text")
    parser.add_argument("--timeout", type=float, default=COLLECTIVE_TIMEOUT_S,
                        help="seconds a collective may wait (default %(default)s)")
    args = parser.parse_args(argv)
    text = args.config_json if args.config_json is not None else storage.read_bytes(args.config).decode("utf-8")
    config = TrainConfig.from_json(text)
    rank = int(next((os.environ[v] for v in rank_variables if v in os.environ), "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(config, args.timeout)
    if rank == 0:
        print(json.dumps(result.to_dict()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line of one ``torchrun`` worker (see :func:`worker_main`)."""
    return worker_main("python -m tasks.train.ddp", __doc__.splitlines()[0], run_worker, ("RANK",), argv)


def torchrun_executable() -> str:
    """Return the path of the ``torchrun`` script next to this interpreter (the venv's).

    Raises ``FileNotFoundError`` when torch's scripts are not installed beside ``sys.executable``."""
    candidate = Path(sys.executable).with_name("torchrun")
    if not candidate.exists():
        raise FileNotFoundError(f"no torchrun next to {sys.executable}; install torch into this environment")
    return str(candidate)


def stop_process_group(process: subprocess.Popen) -> None:
    """Terminate the process group of ``process`` (torchrun and its workers), then kill it."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _absolute_local_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its relative local paths (the MLflow store's included) made absolute: the
    workers run in the project's folder, where a relative path would name another file or none."""
    absolute = storage.absolute_local
    tracking = absolute_tracking_uri(config.mlflow_tracking_uri) if config.mlflow_tracking_uri else None
    return replace(config, dataset_url=absolute(config.dataset_url), output_url=absolute(config.output_url),
                   init_from=absolute(config.init_from), cache_dir=absolute(config.cache_dir),
                   mlflow_tracking_uri=tracking, mlflow_artifact_location=absolute(config.mlflow_artifact_location))


def _copy_output(source, log_file, echo: bool) -> None:
    """Copy the workers' output into ``log_file``; with ``echo``, also show their epoch progress bars
    (the main rank's ``epoch i/n`` lines) on this process's standard error as they advance."""
    pending, logging_ok = b"", True
    for chunk in iter(lambda: source.read1(65536), b""):
        if logging_ok:
            try:
                log_file.write(chunk)
                log_file.flush()
            except OSError as exc:  # a full disk: keep draining the pipe, or the workers would block on it
                logging_ok = False
                log.warning("the workers' log cannot be written any more (%s); their output is dropped", exc)
        if not echo:
            continue
        pending += chunk
        *pieces, pending = pending.replace(b"\r", b"\n").split(b"\n")
        for piece in pieces:
            if piece.startswith(b"epoch "):
                sys.stderr.write(("\r" if sys.stderr.isatty() else "") + piece.decode("utf-8", "replace")
                                 + ("" if sys.stderr.isatty() else "\n"))
                sys.stderr.flush()
    if echo and sys.stderr.isatty():
        sys.stderr.write("\n")


def run_launcher(name: str, nproc: int, command: Callable[[str], list[str]], config: TrainConfig,
                 timeout_s: float | None = None, log_path: str | None = None,
                 env: dict[str, str] | None = None, echo_progress: bool = False) -> TrainResult:
    """Run a multi-worker launcher (``torchrun``, ``horovodrun``) over ``config`` and wait.

    Args:
        name: the launcher's name, for messages and the temporary folder.
        nproc: how many workers it starts (for messages).
        command: builds the launcher's argv from the path of the config JSON it must pass on.
        config: the run's config (written to a temporary JSON file for the workers).
        timeout_s: kill the run after this many seconds (None: no limit).
        log_path: where the workers' combined output goes (default: a temporary file, deleted
            after a successful run).
        env: extra environment variables for the workers.
        echo_progress: also show the epochs' progress bars on standard error (the command line).

    On the CPU each worker gets ``OMP_NUM_THREADS=1`` (unless ``env`` sets it), so workers do
    not fight over the cores. Returns rank 0's :class:`TrainResult`, read from
    ``<output_url>/result.json``. Raises ``RuntimeError`` with the exit status and the tail of
    the log when the launcher fails (or times out).
    """
    config = _absolute_local_paths(config)
    workdir = tempfile.mkdtemp(prefix=f"bgremoval-{name}-")  # private (0700): the config may hold S3 keys
    config_path = os.path.join(workdir, "config.json")
    with open(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        handle.write(config.to_json())
    log_file = log_path or os.path.join(workdir, f"{name}.log")
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), child_env.get("PYTHONPATH")) if p)
    if child_env.get("MLFLOW_TRACKING_URI"):  # relative to here, not to the workers' folder
        child_env["MLFLOW_TRACKING_URI"] = absolute_tracking_uri(child_env["MLFLOW_TRACKING_URI"])
    if child_env.get("BGREMOVAL_MLFLOW_ARTIFACTS"):
        child_env["BGREMOVAL_MLFLOW_ARTIFACTS"] = storage.absolute_local(child_env["BGREMOVAL_MLFLOW_ARTIFACTS"])
    if not _uses_cuda(config):
        child_env["OMP_NUM_THREADS"] = "1"
    if echo_progress and sys.stderr.isatty():
        child_env["BGREMOVAL_PROGRESS_REDRAW"] = "1"  # the bars redraw as on a terminal, through the pipe
    child_env.update(env or {})
    argv = command(config_path)
    log.info("launching %s (log: %s)", " ".join(argv), log_file)
    with open(log_file, "wb") as output:
        # A session of its own, so a timeout can stop the launcher and every worker it started.
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                   cwd=str(_PROJECT_ROOT), start_new_session=True)
        copier = threading.Thread(target=_copy_output, args=(process.stdout, output, echo_progress), daemon=True)
        copier.start()
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
            stop_process_group(process)
        except BaseException:
            stop_process_group(process)
            raise
        finally:
            os.remove(config_path)  # the workers read it at start; nothing with credentials stays behind
            copier.join(timeout=10)
    if returncode != 0:
        with open(log_file, "rb") as handle:
            tail = handle.read()[-6000:].decode("utf-8", "replace")
        if log_path:
            shutil.rmtree(workdir, ignore_errors=True)  # the log is where the caller asked; nothing else is left
        what = f"timed out after {timeout_s} s" if returncode is None else f"exited with status {returncode}"
        raise RuntimeError(f"{name} ({nproc} workers) {what}; full log: {log_file}\n--- log tail ---\n{tail}")
    result_url = layout.train_result(config.output_url)
    result = TrainResult.from_dict(json.loads(storage.read_bytes(result_url, config.storage_options or None)))
    shutil.rmtree(workdir, ignore_errors=True)  # the log too, unless it was asked for elsewhere (log_path)
    return result


def launch_local(config: TrainConfig, nproc: int, timeout_s: float | None = None,
                 log_path: str | None = None, env: dict[str, str] | None = None,
                 echo_progress: bool = False) -> TrainResult:
    """Run ``torchrun --standalone --nproc_per_node=nproc -m tasks.train.ddp`` here and wait.

    ``nproc`` is the number of worker processes on this machine (one per GPU on a GPU machine);
    the other arguments and the result are those of :func:`run_launcher`.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")

    def command(config_path: str) -> list[str]:
        return [torchrun_executable(), "--standalone", f"--nproc_per_node={nproc}",
                "-m", "tasks.train.ddp", "--config", config_path]

    return run_launcher("torchrun", nproc, command, config, timeout_s, log_path, env, echo_progress)


if __name__ == "__main__":
    sys.exit(main())
