"""Training throughput of U2-Net/U2-NetP: images/s per optimiser step, by precision, layout,
compilation and worker count.

What one training step is, exactly as measured (``tasks.model`` + ``tasks.train.loop``):
forward of ``build_model(model)`` in training mode, the deep-supervision loss
(``tasks.train.loop.deep_supervision_loss``: BCE-with-logits on the fused map and the six side
maps, summed, computed in float32), ``backward()``, and a ``torch.optim.Adam`` step
(lr 1e-3, betas 0.9/0.999, eps 1e-8, no weight decay: the original U-2-Net optimiser), then
``zero_grad``. Inputs are one fixed batch of synthetic products rendered with
``tasks.dev.synth.render_item``, stretched to ``size``x``size`` and normalised with the ImageNet
mean/std as ``tasks.train.data.SegmentationDataset`` does; data loading is NOT timed (one batch is
built before the first step and reused), so the numbers are the model's training compute.

Every row of the table is one measurement in fresh processes, with these knobs:

* ``channels_last``: model and input in ``torch.channels_last`` memory format;
* ``bf16``: ``torch.autocast(<device>, dtype=torch.bfloat16)`` around the forward pass
  (``tasks.train.loop.resolve_amp("bf16", ...)``); the loss stays float32. On a CPU without native
  bf16 (AVX-512 BF16 / AMX) bf16 is emulated and slow; the header says which this CPU is;
* ``compile``: ``torch.compile`` (inductor, default mode) of forward + loss; the optimiser step
  is eager. Compilation happens in the first warm-up step; its cost is shown separately
  ("compile s" = first step minus a steady step) and is not in img/s. Every compiled
  measurement starts with an empty inductor cache (``--compile-cache`` reuses one instead);
* ``workers``: 1 worker = one process using every usable core's threads; N > 1 workers =
  N processes started by ``torchrun --standalone`` (the venv's, as ``tasks.train.ddp`` does),
  ``torch.distributed`` with gloo (NCCL on CUDA), the model wrapped in
  ``DistributedDataParallel`` (compiled as ``torch.compile(DDP(...))``), cores / N threads each
  (``OMP_NUM_THREADS``). Batch size is per worker; img/s is the aggregate of all workers
  (N x batch x steps over the slowest worker's time).

Warm-up steps (``--warmup``, default 2) are excluded; img/s is over ``--steps`` timed steps
(default 5). "speed-up" is img/s over the original U-2-Net code's training speed. With
``--original PATH`` (the original repository's ``model/u2net.py``, which the user has; it is never
copied into this project) that speed is measured in the same run: for every model and size, a row
trains the original ``U2NETP``/``U2NET`` class the way the original ``u2net_train.py`` does (fp32,
the seven sigmoid outputs each under ``nn.BCELoss``, summed, the same Adam), once before the
project's rows and once after them, and the faster of the two is the baseline. The file's unused
``from torchvision import models`` is satisfied by an empty module when torchvision is absent (this
project does not install it). Without ``--original``, the baseline is the figure measured once on
the project's 2-core CPU machine (DESIGN.md: 0.61 img/s for U2-NetP and 0.40 img/s for U2-Net at
320x320; ``--baseline`` overrides). Speed-ups are shown only for CPU rows at 320x320. The issue's target
is 1.5x that with the same architecture: 0.92 img/s (U2-NetP) and 0.60 img/s (U2-Net); the
report ends with the fastest combination per model and whether it reaches the target.
"peak RSS" is the sum over workers of each process's peak resident memory
(``VmHWM``, ``process_memory.peak_rss_self_mib``; compilation in the process included, inductor's
compile-worker subprocesses not; ``getrusage``'s ``ru_maxrss`` would be at least the peak of the
process that started the worker). "load" is the machine's 1-minute load
average when the measurement started: other work on the machine shows up in the numbers.

The grid. ``--configs`` names combinations as ``fp32`` or ``+``-joined flags from ``cl``
(channels-last), ``bf16`` and ``compile`` (e.g. ``cl+bf16+compile``; ``all`` = the 8 combinations),
and ``heap``: freed memory kept in the process's heap, as training on the CPU does
(``tasks.core.heap.keep_freed_memory``; without it glibc's defaults, as before that change).
Without ``--configs``: all 8 for u2netp at 320, and ``fp32``, ``cl+bf16``, ``cl+bf16+compile``
for every other model/size. Without ``--workers`` (``auto``): every config with 1 worker, then
for each model/size 2 workers for ``fp32`` and for the fastest 1-worker config (on CUDA only when
there are 2 GPUs); ``--workers 1 2`` runs every config with both.

CUDA (``--device cuda``): one GPU per worker, bf16 autocast on the GPU, a CUDA synchronise after
every step, and "peak GPU mem" from ``torch.cuda.max_memory_allocated`` (over warm-up and timed
steps). ``--batch auto`` takes the largest per-worker batch whose training step fits, found with
``tasks.train.batch_size.find_batch_size`` + ``training_step_probe`` (starting at
``--auto-start``, default 512), as ``TrainConfig(batch_size="auto")`` does; with several workers
the smallest of their answers. ``--batch auto`` is refused on the CPU (the probe would run the
machine out of memory instead of raising).

Run it from the project root (nothing is written to the repository unless ``--json`` points
there):

    .venv/bin/python benchmarks/train_throughput.py                 # the full grid, 1-1.5 h on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --quick         # 320 only, 3 configs, ~30 min on 2 cores

Most of that time is compilation (4-6 minutes per compiled row on 2 cores, from an empty cache).
    .venv/bin/python benchmarks/train_throughput.py --models u2netp --sizes 320 --configs all --workers 1
    .venv/bin/python benchmarks/train_throughput.py --device cuda --batch auto --json benchmarks/results/train-h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from process_memory import peak_rss_self_mib  # noqa: E402
from tasks.core.heap import keep_freed_memory  # noqa: E402
from tasks.model.config import MODEL_NAMES  # noqa: E402
from tasks.model.u2net import build_model, count_parameters  # noqa: E402
from tasks.dev.synth import SynthConfig, render_item  # noqa: E402
from tasks.train.batch_size import find_batch_size, training_step_probe  # noqa: E402
from tasks.train.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tasks.train.ddp import stop_process_group, torchrun_executable  # noqa: E402
from tasks.train.loop import cpu_supports_bf16, deep_supervision_loss, resolve_amp  # noqa: E402

MIB = 1024 * 1024
FLAGS = ("cl", "bf16", "compile", "heap")
#: Every combination of the first three flags, baseline first (``heap`` is asked for by name).
ALL_CONFIGS = tuple("+".join(f for f, on in zip(FLAGS[:3], bits) if on) or "fp32"
                    for bits in sorted(itertools.product((False, True), repeat=3), key=lambda b: (sum(b), b[::-1])))
SUBSET_CONFIGS = ("fp32", "cl+bf16", "cl+bf16+compile")
#: Training img/s of the original U-2-Net code on the project's 2-core CPU at 320x320 (DESIGN.md).
ORIGINAL_IMG_PER_S = {"u2netp": 0.61, "u2net": 0.40}
TARGET_SPEEDUP = 1.5
#: The seed's training job: 30,000 images x 30 epochs of U2-Net at 320 px took 9 h on 20 GPUs.
SEED_IMAGES, SEED_GPU_HOURS = 30_000 * 30, 9 * 20
#: The config name of the original code's rows (``--original``).
ORIGINAL = "original"
DISTINCT_IMAGES = 16  # rendered products per worker; larger batches repeat them


# --------------------------------------------------------------------------------------- configs


def parse_config(name: str) -> dict:
    """``"cl+bf16+compile"`` -> ``{"name": ..., "channels_last": True, "bf16": True, "compile": True}``.

    Accepts the flags in any order (``fp32`` alone means none); returns the canonical name.
    Raises ``ValueError`` for an unknown flag.
    """
    tokens = {t.strip().lower() for t in name.split("+") if t.strip()}
    tokens.discard("fp32")
    unknown = tokens - set(FLAGS)
    if unknown:
        raise ValueError(f"unknown config flag(s) {sorted(unknown)} in {name!r}: use fp32 or "
                         f"+-joined flags from {', '.join(FLAGS)} (e.g. cl+bf16+compile), or 'all'")
    canonical = "+".join(f for f in FLAGS if f in tokens) or "fp32"
    return {"name": canonical, "channels_last": "cl" in tokens, "bf16": "bf16" in tokens, "compile": "compile" in tokens,
            "heap": "heap" in tokens}


def expand_configs(names: list[str]) -> list[str]:
    """Canonical config names for ``--configs`` (``all`` expands to the 8 combinations), deduplicated."""
    out: list[str] = []
    for name in names:
        for canonical in (ALL_CONFIGS if name.lower() == "all" else (parse_config(name)["name"],)):
            if canonical not in out:
                out.append(canonical)
    return out


def default_configs(model: str, size: int) -> tuple[str, ...]:
    """The default grid: all 8 combinations for u2netp at 320, the three-config subset elsewhere."""
    return ALL_CONFIGS if (model, size) == ("u2netp", 320) else SUBSET_CONFIGS


# --------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def total_memory_gib() -> float | None:
    """Physical memory in GiB from ``/proc/meminfo``, or None when unavailable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine_facts(device: str) -> dict:
    """Cores, CPU, memory, GPU, OS and library versions, and the load average now."""
    facts = {
        "cores": os.cpu_count(),
        "cores_usable": usable_cores(),
        "cpu_model": cpu_model(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "memory_gib": total_memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gcc": shutil.which("g++") or shutil.which("gcc"),
        "load_average_at_start": load_average(),
        "gpus": [],
    }
    if device == "cuda":
        facts["gpus"] = gpu_names()
        facts["cuda"] = torch.version.cuda
    return facts


def gpu_names() -> list[str]:
    """``name, memory`` of every GPU from ``nvidia-smi`` (so this process creates no CUDA context,
    which would hold GPU memory the measurements need); empty when nvidia-smi is missing."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------- worker


class LossNet(nn.Module):
    """Forward + deep-supervision loss as one module, so DDP wraps it and ``torch.compile`` sees
    both; the forward pass runs under autocast ``amp_dtype`` (None: float32), the loss in float32."""

    def __init__(self, model: nn.Module, device_type: str, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.amp_dtype = amp_dtype

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            output = self.model(images)
        return deep_supervision_loss(output, masks)


def synthetic_batch(batch: int, size: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` rendered products (distinct per rank, at most ``DISTINCT_IMAGES`` then repeated) as
    a normalised float32 B x 3 x size x size image tensor and a B x 1 x size x size mask in [0, 1]."""
    config = SynthConfig(n=DISTINCT_IMAGES, seed=seed, max_side=max(size, 64))
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    images, masks = [], []
    for i in range(min(batch, DISTINCT_IMAGES)):
        item = render_item(rank * DISTINCT_IMAGES + i, config)
        image = (item.image.astype(np.float32) * np.float32(1 / 255) - mean) / std
        mask = item.mask.astype(np.float32) * np.float32(1 / 255)
        shrink = size <= image.shape[0] and size <= image.shape[1]
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        images.append(cv2.resize(image, (size, size), interpolation=interpolation).transpose(2, 0, 1))
        masks.append(cv2.resize(mask, (size, size), interpolation=interpolation)[None])
    picks = [i % len(images) for i in range(batch)]
    x = torch.from_numpy(np.ascontiguousarray(np.stack([images[i] for i in picks])))
    y = torch.from_numpy(np.ascontiguousarray(np.stack([masks[i] for i in picks])))
    return x, y


def resolve_batch(spec: dict, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                  world_size: int) -> int:
    """The per-worker batch: ``spec["batch"]``, or for ``"auto"`` the largest that fits
    (``find_batch_size`` over ``training_step_probe``; the minimum over workers)."""
    if spec["batch"] != "auto":
        return int(spec["batch"])
    step = training_step_probe(model, spec["size"], device, amp_dtype, spec["channels_last"])
    size = find_batch_size(step, start=spec["auto_start"])
    del step
    if world_size > 1:
        found = torch.tensor([size], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        size = int(found.item())
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return size


def worker_main(spec: dict, out_path: str | None) -> int:
    """One worker of one measurement (``--worker``): build, warm up, time, report (rank 0 writes
    ``out_path``). Runs alone, or under torchrun when ``WORLD_SIZE`` > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec["device"] == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = bool(spec.get("cudnn_benchmark"))
    else:
        device = torch.device("cpu")
        torch.set_num_threads(spec["threads"])
    if spec.get("heap") and not keep_freed_memory():  # as tasks.train.loop.train does on the CPU
        raise RuntimeError("the heap row cannot keep freed memory here (not glibc, or BGREMOVAL_SYSTEM_MALLOC set)")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=spec["timeout"]), **kwargs)
    try:
        return _measure(spec, device, rank, world_size, out_path)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


class OriginalLossNet(nn.Module):
    """The original training step's forward and loss: its model returns seven sigmoid maps, each
    scored by ``nn.BCELoss`` against the mask, summed (``muti_bce_loss_fusion`` in ``u2net_train.py``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.bce = nn.BCELoss()

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return sum(self.bce(side, masks) for side in self.model(images))


def original_model(path: str, model: str) -> nn.Module:
    """``U2NETP(3, 1)`` or ``U2NET(3, 1)`` from the original repository's ``model/u2net.py`` at ``path``."""
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is None:  # imported there, never used
        sys.modules["torchvision"] = types.ModuleType("torchvision")
        sys.modules["torchvision"].models = types.ModuleType("torchvision.models")
    spec = importlib.util.spec_from_file_location("u2net_original", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"u2netp": module.U2NETP, "u2net": module.U2NET}[model](3, 1)


def _measure(spec: dict, device: torch.device, rank: int, world_size: int, out_path: str | None) -> int:
    torch.manual_seed(spec["seed"])  # the same initial weights on every worker
    amp_dtype, _ = resolve_amp("bf16" if spec["bf16"] else "off", device)
    original = spec.get("original")
    model = (original_model(original, spec["model"]) if original else build_model(spec["model"])).to(device).train()
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    batch = resolve_batch(spec, model, device, amp_dtype, world_size)
    images, masks = synthetic_batch(batch, spec["size"], rank, spec["seed"])
    images, masks = images.to(device), masks.to(device)
    if spec["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)

    net: nn.Module = OriginalLossNet(model) if original else LossNet(model, device.type, amp_dtype)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if spec["compile"]:
        net = torch.compile(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        loss = net(images, masks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, loss.detach()

    warmup_s = [step()[0] for _ in range(spec["warmup"])]
    if world_size > 1:
        dist.barrier()
    timed_s, last_loss = [], None
    for _ in range(spec["steps"]):
        seconds, last_loss = step()
        timed_s.append(seconds)
    loss_value = float(last_loss.float().item())
    if not np.isfinite(loss_value):
        raise FloatingPointError(f"training loss is {loss_value} after {spec['warmup'] + spec['steps']} steps")
    mine = {
        "rank": rank,
        "warmup_s": warmup_s,
        "step_s": timed_s,
        "elapsed_s": sum(timed_s),
        "peak_rss_mib": peak_rss_self_mib(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None,
        "loss": loss_value,
    }
    ranks = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if rank == 0 and out_path:
        slowest = max(r["elapsed_s"] for r in ranks)
        steady = statistics.median(timed_s)
        first = warmup_s[0] if warmup_s else None
        report = {
            "batch": batch,
            "parameters": count_parameters(model),
            "images_per_s": world_size * batch * spec["steps"] / slowest,
            "step_s_median": steady,
            "first_step_s": first,
            "compile_s": max(0.0, first - steady) if (spec["compile"] and first is not None) else None,
            "peak_rss_mib": sum(r["peak_rss_mib"] for r in ranks),
            "peak_gpu_mib": max(r["peak_gpu_mib"] for r in ranks) if device.type == "cuda" else None,
            "ranks": ranks,
            "torch_threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        }
        Path(out_path).write_text(json.dumps(report))
    return 0


# --------------------------------------------------------------------------------------- parent


def run_measurement(spec: dict, work: Path, args: argparse.Namespace) -> dict:
    """Run one measurement in fresh process(es); return the spec merged with rank 0's report, or
    with an ``error`` (the log's tail) when it failed or timed out."""
    tag = f"{spec['model']}-{spec['size']}-{spec['config']}-w{spec['workers']}"
    out_path, log_path = work / f"{tag}.json", work / f"{tag}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if spec["device"] == "cpu":
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(spec["threads"])
    if spec["compile"]:
        cache = Path(args.compile_cache) if args.compile_cache else work / f"inductor-{tag}"
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        env["TRITON_CACHE_DIR"] = str(cache / "triton")
    worker_args = [str(Path(__file__).resolve()), "--worker", "--spec", json.dumps(spec), "--out", str(out_path)]
    if spec["workers"] == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [torchrun_executable(), "--standalone", f"--nproc_per_node={spec['workers']}", *worker_args]
    load = load_average()
    result = {**spec, "load_1min_at_start": load[0] if load else None}
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                   start_new_session=True)
        try:
            code: int | None = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            code = None
            stop_process_group(process)
        except BaseException:
            stop_process_group(process)
            raise
    result["wall_s"] = time.perf_counter() - started
    if code == 0 and out_path.exists():
        result.update(json.loads(out_path.read_text()))
        return result
    tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
    what = f"timed out after {args.timeout:.0f} s" if code is None else f"exited with status {code}"
    result["error"] = f"{what}; log tail:\n{tail}"
    return result


def make_spec(model: str, size: int, config: str, workers: int, args: argparse.Namespace) -> dict:
    """Everything a worker needs for one measurement (JSON-serialisable); ``config`` ``"original"`` is
    the original code's training step (``--original``)."""
    flags = parse_config("fp32" if config == ORIGINAL else config)
    threads = max(1, usable_cores() // workers) if args.device == "cpu" else 1
    return {"model": model, "size": size, "config": flags["name"], "channels_last": flags["channels_last"],
            "bf16": flags["bf16"], "compile": flags["compile"], "heap": flags["heap"], "workers": workers,
            "threads": threads,
            "batch": args.batch, "auto_start": args.auto_start, "warmup": args.warmup, "steps": args.steps,
            "device": args.device, "seed": args.seed, "timeout": args.timeout,
            "cudnn_benchmark": args.cudnn_benchmark,
            **({"config": ORIGINAL, "original": str(args.original)} if config == ORIGINAL else {})}


def speedup(row: dict, baselines: dict[str, float]) -> float | None:
    """img/s over the original code's, for CPU rows at 320x320 of a model with a baseline (not for the
    original code's own rows)."""
    if (row.get("error") or row.get("original") or row["device"] != "cpu" or row["size"] != 320
            or row["model"] not in baselines):
        return None
    return row["images_per_s"] / baselines[row["model"]]


def measure_loader(size: int, batch: int, workers: int, work: Path, batches: int = 24) -> dict:
    """Images/s of the training data loader alone (``SegmentationDataset`` with its random flip,
    ``DataLoader`` with ``workers`` processes, pinned memory on CUDA) over a synthetic clean dataset of
    studio-size photos cleaned to ``size`` px: what one training process can be fed, to compare with
    its training img/s. The first batch (worker start-up) is not timed."""
    from torch.utils.data import DataLoader

    from tasks.dev.synthetic import write_synthetic_dataset
    from tasks.train.data import SegmentationDataset, prepare_split

    url = str(work / f"loader-{size}")
    if not Path(url, "manifest.parquet").exists():
        write_synthetic_dataset(url, 64, seed=5, max_side=size)
    dataset = SegmentationDataset(prepare_split(url, "train"), size, train=True)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch * (batches + 1))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available())
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    count = sum(images.shape[0] for images, _ in iterator)
    seconds = time.perf_counter() - started
    return {"size": size, "batch": batch, "workers": workers, "images_per_s": count / seconds,
            "ms_per_batch": 1000 * seconds / batches}


def seed_job(row: dict) -> str:
    """The seed's workload (:data:`SEED_IMAGES` at this row's img/s): device-hours, i.e. GPU-hours on
    CUDA (hours x workers, one GPU each) and hours of this whole machine on the CPU."""
    hours = SEED_IMAGES / row["images_per_s"] / 3600
    return f"{hours * row['workers']:,.0f} GPU-h" if row["device"] == "cuda" else f"{hours:,.0f} h"


def fmt_mib(mib: float | None) -> str:
    """``812 MiB`` / ``3.41 GiB``, or ``-``."""
    if mib is None:
        return "-"
    return f"{mib:.0f} MiB" if mib < 1024 else f"{mib / 1024:.2f} GiB"


def format_row(row: dict, baselines: dict[str, float]) -> list[str]:
    """One table line (the error's first line in place of the numbers when it failed)."""
    yes = {True: "yes", False: "no"}
    name = row["model"] + (" (original code)" if row.get("original") else "")
    lead = [name, str(row["size"]), yes[row["channels_last"]], yes[row["bf16"]], yes[row["compile"]],
            yes[bool(row.get("heap"))], str(row["workers"]), str(row["threads"]) if row["device"] == "cpu" else "-"]
    load = f"{row['load_1min_at_start']:.2f}" if row.get("load_1min_at_start") is not None else "-"
    if row.get("error"):
        return lead + [str(row["batch"]), "FAILED: " + row["error"].splitlines()[0], "", "", "", "", "", "", load] + \
            ([""] if row["device"] == "cuda" else [])
    ratio = speedup(row, baselines)
    cells = lead + [str(row["batch"]), f"{row['images_per_s']:.3f}", f"{ratio:.2f}x" if ratio is not None else "-",
                    f"{row['step_s_median']:.2f}",
                    f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "-",
                    f"{row['first_step_s']:.1f}" if row.get("first_step_s") is not None else "-",
                    fmt_mib(row["peak_rss_mib"]), seed_job(row), load]
    if row["device"] == "cuda":
        cells.append(fmt_mib(row.get("peak_gpu_mib")))
    return cells


def render_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Plain-text table with aligned columns; column indexes in ``right`` are right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_results(rows: list[dict], args: argparse.Namespace, baselines: dict[str, float]) -> str:
    """The results table."""
    headers = ["model", "size", "channels_last", "bf16", "compile", "heap", "workers", "threads/w", "batch/w", "img/s",
               "speed-up", "step s", "compile s", "1st step s", "peak RSS", "seed job", "load"]
    if args.device == "cuda":
        headers.append("peak GPU mem")
    table = render_table(headers, [format_row(r, baselines) for r in rows], right=set(range(6, len(headers))) | {1})
    return (f"Training throughput ({args.warmup} warm-up + {args.steps} timed steps per row; img/s = all workers; "
            "speed-up vs the original U-2-Net code at 320; compile s = 1st step - steady step; "
            "peak RSS = sum over workers; seed job = the seed's 30,000 images x 30 epochs at this img/s, "
            f"against its {SEED_GPU_HOURS} GPU-hours for U2-Net at 320; load = 1-min load average at the row's start)\n"
            + table)


def verdicts(rows: list[dict], baselines: dict[str, float]) -> tuple[list[str], list[dict]]:
    """For every model measured on the CPU at 320: the fastest row and whether it reaches 1.5x."""
    lines, found = [], []
    for model in dict.fromkeys(r["model"] for r in rows):
        candidates = [r for r in rows if r["model"] == model and speedup(r, baselines) is not None]
        if not candidates:
            continue
        base = baselines[model]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["images_per_s"])
        target = TARGET_SPEEDUP * base
        ratio = best["images_per_s"] / base
        reached = best["images_per_s"] >= target
        lines.append(f"{model} @320: fastest = {best['config']}, {best['workers']} worker(s) x batch {best['batch']}: "
                     f"{best['images_per_s']:.3f} img/s = {ratio:.2f}x the original code ({base:.2f} img/s) -> "
                     f"{'REACHES' if reached else 'does NOT reach'} the {TARGET_SPEEDUP:g}x target ({target:.2f} img/s)")
        found.append({"model": model, "config": best["config"], "workers": best["workers"], "batch": best["batch"],
                      "images_per_s": best["images_per_s"], "speedup": ratio, "target_images_per_s": target,
                      "reached": reached})
    return lines, found


def format_header(facts: dict, args: argparse.Namespace, baselines: dict[str, float]) -> str:
    """Machine facts and the run's settings."""
    memory = f"{facts['memory_gib']:.1f} GiB RAM" if facts["memory_gib"] else "RAM unknown"
    load = facts["load_average_at_start"]
    load_text = f", load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (1/5/15 min) at start" if load else ""
    lines = [
        f"train_throughput: U2-Net/U2-NetP training images/s on {args.device}" + ("  (--quick)" if args.quick else ""),
        f"machine : {facts['cores']} cores ({facts['cores_usable']} usable), CPU {facts['cpu_model']!r} "
        f"(native bf16: {'yes' if facts['cpu_native_bf16'] else 'no, emulated'}), {memory}, {facts['os']}{load_text}",
        f"software: Python {facts['python']}, torch {facts['torch']}",
        f"step    : forward + deep-supervision BCE-with-logits (7 outputs) + backward + Adam(lr 1e-3); "
        f"one fixed synthetic batch, data loading not timed; seed {args.seed}",
        ("baseline: original U-2-Net code (" + (f"{args.original}, measured in this run" if args.original else
                                                "DESIGN.md, the project's 2-core CPU") + "), 320x320 training: ")
        + ", ".join(f"{m} {v:.2f} img/s" for m, v in baselines.items())
        + f" (target {TARGET_SPEEDUP:g}x: " + ", ".join(f"{m} {TARGET_SPEEDUP * v:.2f}" for m, v in baselines.items()) + ")",
    ]
    if facts["gpus"]:
        lines.append(f"gpus    : {', '.join(facts['gpus'])} (CUDA {facts.get('cuda')})")
    if args.compile_cache:
        lines.append(f"compile : inductor cache reused from {args.compile_cache} (compile s is a warm-cache time)")
    return "\n".join(lines)


def plan(args: argparse.Namespace) -> list[tuple[str, int, list[str]]]:
    """``(model, size, configs)`` for every model/size, in run order."""
    return [(model, size, expand_configs(args.configs) if args.configs else list(default_configs(model, size)))
            for model in args.models for size in args.sizes]


def run_grid(args: argparse.Namespace, work: Path, baselines: dict[str, float]) -> list[dict]:
    """Run every measurement (printing each row as it completes); ``auto`` workers adds the
    2-worker rows for fp32 and the fastest 1-worker config of each model/size."""
    rows: list[dict] = []
    auto_workers = args.workers == ["auto"]
    explicit = [1] if auto_workers else sorted({int(w) for w in args.workers})
    two_ok = args.device == "cpu" or torch.cuda.device_count() >= 2
    if args.device == "cpu" and usable_cores() < 2:
        two_ok = False

    def run(model: str, size: int, config: str, workers: int) -> dict:
        spec = make_spec(model, size, config, workers, args)
        print(f"  {model} {size} {spec['config']} x{workers} worker(s), {spec['threads']} thread(s) each ...",
              end=" ", flush=True)
        row = run_measurement(spec, work, args)
        print("FAILED" if row.get("error") else f"{row['images_per_s']:.3f} img/s (batch {row['batch']}, "
              f"wall {row['wall_s']:.0f} s)", flush=True)
        if row.get("error") and args.verbose:
            print(row["error"], flush=True)
        rows.append(row)
        return row

    for model, size, configs in plan(args):
        before = run(model, size, ORIGINAL, 1) if args.original else None
        group = [run(model, size, config, workers) for workers in explicit for config in configs]
        if auto_workers and two_ok:
            ok = [r for r in group if not r.get("error")]
            picks = ["fp32"] if "fp32" in configs else []
            if ok:
                fastest = max(ok, key=lambda r: r["images_per_s"])["config"]
                if fastest not in picks:
                    picks.append(fastest)
            for config in picks:
                run(model, size, config, 2)
        if before is not None:
            after = run(model, size, ORIGINAL, 1)
            measured = [r["images_per_s"] for r in (before, after) if not r.get("error")]
            if measured and size == 320 and args.device == "cpu":
                baselines[model] = max(measured)  # the same run's original code, the less disturbed round
    return rows


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(reversed(MODEL_NAMES)), choices=MODEL_NAMES,
                        help="models to measure (default: u2netp u2net)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[320, 160], help="square input sizes (default 320 160)")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="fp32, or +-joined flags from cl, bf16, compile, heap (e.g. cl+bf16+compile), or all "
                             "(the 8 combinations of cl, bf16, compile; default: all 8 for u2netp at 320, fp32 cl+bf16 "
                             "cl+bf16+compile elsewhere)")
    parser.add_argument("--workers", nargs="+", default=["auto"],
                        help="worker counts for every config, e.g. 1 2 (default auto: 1 for every config, then 2 "
                             "for fp32 and the fastest 1-worker config)")
    parser.add_argument("--batch", default="4", help="images per worker per step, or auto (CUDA only; default 4)")
    parser.add_argument("--auto-start", type=int, default=512, help="first batch tried by --batch auto (default 512)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps; compilation happens in the first "
                                                              "(default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="only 320, configs fp32 cl+bf16 cl+bf16+compile, 3 timed steps (unless given explicitly)")
    parser.add_argument("--original", type=Path, default=None, metavar="PATH",
                        help="the original U-2-Net repository's model/u2net.py: measure its training step in the "
                             "same run, before and after each model's rows, and use it as the baseline")
    parser.add_argument("--baseline", nargs="+", default=[], metavar="MODEL=IMG_PER_S",
                        help="override the original code's 320x320 training img/s (default u2netp=0.61 u2net=0.40)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="reuse this inductor cache folder (default: an empty one per compiled measurement)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark on CUDA")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one measurement may take (default 1800)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], metavar="N",
                        help="DataLoader worker processes for the data-loader rows (default 0 2)")
    parser.add_argument("--seed", type=int, default=0, help="weights and synthetic images seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number to PATH as JSON")
    parser.add_argument("--verbose", action="store_true", help="print a failed measurement's log tail as it happens")
    internal = parser.add_argument_group("internal (one worker of one measurement)")
    internal.add_argument("--worker", action="store_true", help="run one worker and exit")
    internal.add_argument("--spec", help="the measurement as JSON")
    internal.add_argument("--out", help="where rank 0 writes its JSON report")
    return parser


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Shrink the grid for ``--quick`` unless the options were given explicitly."""
    if not args.quick:
        return
    quick = {"sizes": [320], "configs": list(SUBSET_CONFIGS), "steps": 3}
    for name, value in quick.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, float]:
    """Reject options that cannot produce a measurement; return the baselines."""
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if any(s < 32 for s in args.sizes):
        parser.error("--sizes must be >= 32 (U2-Net pools 5 times)")
    if args.batch != "auto":
        try:
            if int(args.batch) < 1:
                raise ValueError
        except ValueError:
            parser.error(f"--batch must be a positive integer or auto, got {args.batch!r}")
        if int(args.batch) == 1 and min(args.sizes) <= 32:
            parser.error("a batch of 1 at 32x32 leaves 1x1 maps BatchNorm cannot train on: use --batch 2 or more")
    elif args.device != "cuda":
        parser.error("--batch auto needs --device cuda (on the CPU the probe would exhaust the machine's memory)")
    if args.configs:
        try:
            expand_configs(args.configs)
        except ValueError as exc:
            parser.error(str(exc))
    if args.workers != ["auto"]:
        try:
            if min(int(w) for w in args.workers) < 1:
                raise ValueError
        except ValueError:
            parser.error(f"--workers takes auto or positive integers, got {args.workers}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but torch.cuda.is_available() is False (this torch is "
                         f"{torch.__version__}); run on a GPU machine or use --device cpu")
        if args.workers != ["auto"] and max(int(w) for w in args.workers) > torch.cuda.device_count():
            parser.error(f"--workers {max(int(w) for w in args.workers)} needs as many GPUs; "
                         f"this machine has {torch.cuda.device_count()}")
    if args.original is not None:
        if not args.original.is_file():
            parser.error(f"--original {args.original}: no such file (the original repository's model/u2net.py)")
        args.original = args.original.resolve()
    baselines = dict(ORIGINAL_IMG_PER_S)
    for item in args.baseline:
        name, _, value = item.partition("=")
        if name not in MODEL_NAMES or not value:
            parser.error(f"--baseline takes MODEL=IMG_PER_S with MODEL in {MODEL_NAMES}, got {item!r}")
        baselines[name] = float(value)
    return baselines


def main(argv: list[str] | None = None) -> int:
    """Entry point: one worker (``--worker``), or the whole grid."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if not args.spec:
            parser.error("--worker needs --spec")
        return worker_main(json.loads(args.spec), args.out)
    apply_quick(args, parser)
    baselines = validate(args, parser)
    facts = machine_facts(args.device)
    header = format_header(facts, args, baselines)
    print(header, flush=True)
    print(f"\nmeasuring (each row in fresh processes; command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}) ...",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="train_throughput-"))
    try:
        rows = run_grid(args, work, baselines)
        loaders = [measure_loader(size, int(args.batch) if args.batch != "auto" else 32, workers, work)
                   for size in args.sizes for workers in args.loader_workers]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()
    lines, best = verdicts(rows, baselines)
    notes = [f"load average at end: {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} (1/5/15 min) "
             f"on {facts['cores']} cores"] if load_end else []
    failures = [r for r in rows if r.get("error")]
    for row in failures:
        notes.append(f"FAILED {row['model']} {row['size']} {row['config']} x{row['workers']}: {row['error']}")
    header = format_header(facts, args, baselines)  # the baselines measured in this run, with --original
    loader_table = ("Data loader alone (SegmentationDataset + DataLoader, random flip; feeds ONE training process: "
                    "compare with its img/s; the training loop logs the share of each epoch spent waiting for data)\n"
                    + render_table(["size", "batch", "loader processes", "img/s", "ms/batch"],
                                   [[str(r["size"]), str(r["batch"]), str(r["workers"]), f"{r['images_per_s']:.1f}",
                                     f"{r['ms_per_batch']:.1f}"] for r in loaders], right={0, 1, 2, 3, 4}))
    report = "\n\n".join([header, format_results(rows, args, baselines), loader_table,
                          *(["Target (1.5x the original code, same architecture, CPU, 320x320)\n" + "\n".join(lines)]
                            if lines else []),
                          *(["\n".join(notes)] if notes else [])])
    print("\n" + report, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("worker", "spec", "out")}
        args.json.write_text(json.dumps({"machine": facts, "settings": settings, "baselines": baselines,
                                         "rows": rows, "loaders": loaders, "target": best,
                                         "load_average_at_end": load_end,
                                         "table": report}, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if failures and len(failures) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
