"""Tests for the batch-size finder under a simulated memory limit."""

from __future__ import annotations

import pytest
import torch

from tasks.model.config import StageWidths, U2NetConfig
from tasks.model.u2net import U2Net
from tasks.train.batch_size import find_batch_size, is_out_of_memory, training_step_probe

torch.set_num_threads(1)


class SimulatedMemory:
    """A step function that runs ``inner(n)`` but raises an out-of-memory error above ``limit``
    samples, the way a GPU does; it records every size tried."""

    def __init__(self, limit: int, inner=None, error: type[BaseException] = torch.OutOfMemoryError) -> None:
        self.limit = limit
        self.inner = inner
        self.error = error
        self.tried: list[int] = []

    def __call__(self, n: int) -> None:
        self.tried.append(n)
        if n > self.limit:
            raise self.error(f"CUDA out of memory. Tried to allocate {n * 100} MiB (simulated limit {self.limit})")
        if self.inner is not None:
            self.inner(n)


@pytest.mark.parametrize("limit", [1, 5, 16, 20, 31, 32, 100])
def test_finder_returns_the_largest_size_under_the_limit(limit: int) -> None:
    step = SimulatedMemory(limit)
    assert find_batch_size(step, start=32) == min(limit, 32)
    # First the halvings from 32 down to the first size that fits, then bisection above it.
    halvings = [32]
    while halvings[-1] > limit:
        halvings.append(halvings[-1] // 2)
    assert step.tried[: len(halvings)] == halvings
    assert all(halvings[-1] < n < halvings[-2] for n in step.tried[len(halvings):])


def test_finder_without_refinement_halves_only() -> None:
    step = SimulatedMemory(20)
    assert find_batch_size(step, start=32, refine=False) == 16
    assert step.tried == [32, 16]


def test_finder_respects_max_size_and_runtime_error_messages() -> None:
    step = SimulatedMemory(1000, error=RuntimeError)
    assert find_batch_size(step, start=64, max_size=12) == 12
    assert step.tried == [12]
    cpu_style = SimulatedMemory(6, error=RuntimeError)
    assert find_batch_size(cpu_style, start=8) == 6


def test_finder_raises_when_one_sample_does_not_fit_and_passes_other_errors() -> None:
    with pytest.raises(RuntimeError, match="batch of 1 sample runs out of memory"):
        find_batch_size(SimulatedMemory(0), start=8)

    def broken(n: int) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        find_batch_size(broken, start=8)


def test_is_out_of_memory_recognises_the_usual_errors() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))


def test_real_training_step_under_a_simulated_limit_picks_the_right_size() -> None:
    tiny = U2Net(U2NetConfig(encoder=(StageWidths(2, 4),) * 6, decoder=(StageWidths(2, 4),) * 5))
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    rng_before = torch.get_rng_state()
    probe = training_step_probe(tiny, 32, torch.device("cpu"))
    step = SimulatedMemory(6, inner=probe)
    assert find_batch_size(step, start=16) == 6
    assert step.tried == [16, 8, 4, 6, 7]
    # The probe trains a copy: the model's weights, BatchNorm statistics and the RNG are untouched.
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_before)
