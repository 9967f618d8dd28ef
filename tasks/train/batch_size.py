"""The batch-size finder behind ``batch_size="auto"``: the largest batch whose training step fits.

``find_batch_size(step)`` tries ``step(n)`` from a starting guess, halves ``n`` after every
out-of-memory error until a step fits, then bisects between the size that fit and the smallest
that did not, and returns the largest size that fits. ``step`` is any callable that runs (or
simulates) one forward + backward pass of ``n`` samples; :func:`training_step_probe` builds the
real one, and tests pass one that raises an out-of-memory error above a chosen size.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["find_batch_size", "is_out_of_memory", "training_step_probe"]

log = logging.getLogger(__name__)

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and for ``RuntimeError`` s whose message says memory
    ran out (CUDA, the CPU allocator, MPS)."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS)
    )


def _release_memory() -> None:
    # CPU tensors are freed by reference counting; CUDA's caching allocator must also be emptied.
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def find_batch_size(step: Callable[[int], object], start: int = 32, max_size: int | None = None,
                    refine: bool = True) -> int:
    """Return the largest batch size ``n`` for which ``step(n)`` runs without running out of memory.

    Args:
        step: runs one training step (forward + backward) on ``n`` samples; it must raise
            ``torch.OutOfMemoryError`` (or a ``RuntimeError`` saying "out of memory") when ``n``
            does not fit. Other exceptions propagate unchanged.
        start: the first size tried (the upper bound unless it is larger than ``max_size``).
        max_size: an upper bound (e.g. the samples one worker sees per epoch).
        refine: after halving to a size that fits, bisect between it and the failing size
            (``log2`` extra steps) so the result is the largest fitting size, not only the
            largest fitting power-of-two fraction of ``start``.

    Raises ``RuntimeError`` when even one sample does not fit.
    """
    if start < 1:
        raise ValueError(f"start must be >= 1, got {start}")
    size = min(start, max_size) if max_size else start

    def fits(n: int) -> bool:
        try:
            step(n)
        except BaseException as exc:  # noqa: BLE001 - re-raised unless it is an OOM error
            if not is_out_of_memory(exc):
                raise
            log.info("batch size %d does not fit: %s", n, (str(exc).splitlines() or [""])[0][:200])
            ok = False
        else:
            return True
        _release_memory()  # outside the except block, once the traceback's tensors are gone
        return ok

    failed: int | None = None
    while not fits(size):
        failed = size
        if size == 1:
            raise RuntimeError("a training step with a batch of 1 sample runs out of memory: use a smaller "
                               "model (u2netp), a smaller input_size, amp='bf16'/'fp16', or a larger device")
        size //= 2
    if refine and failed is not None:
        low, high = size, failed  # low fits, high does not
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        size = low
    log.info("batch size finder: %d samples per step fit", size)
    return size


def training_step_probe(model: nn.Module, input_size: int, device: torch.device,
                        amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                        lr: float = 1e-3) -> Callable[[int], None]:
    """Return ``step(n)``: one realistic training step of a copy of ``model`` on ``n`` random
    ``input_size``² images on ``device`` (forward with autocast ``amp_dtype``, deep-supervision
    BCE on all outputs, backward, an AdamW step so the optimiser state is allocated too).

    The copy is made once, so the real model's weights and BatchNorm statistics are untouched;
    the random inputs come from a private generator, so the global RNG is not consumed.
    """
    probe = copy.deepcopy(model).to(device).train()
    if channels_last:
        probe = probe.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def step(n: int) -> None:
        x = torch.randn(n, probe.in_channels, input_size, input_size, generator=generator).to(device)
        y = (torch.rand(n, probe.out_channels, input_size, input_size, generator=generator) > 0.5).float().to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = probe(x).all()
            loss = sum(F.binary_cross_entropy_with_logits(o.float(), y) for o in outputs)
            loss.backward()
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
            del x, y
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step
