"""Cutting a list of work into shards for an orchestrator's mapped tasks."""

from __future__ import annotations

import math

#: Pairs one mapped task takes when a dataset version is cleaned or featurised (the training
#: DAG's ``shard_size``): big enough to amortise a task's start, small enough to spread.
PAIRS_PER_SHARD = 250


def shard_ranges(n: int, shard_size: int, max_shards: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in shards of ``shard_size`` items.

    ``max_shards`` caps the number of shards (Airflow maps at most ``[core] max_map_length`` task
    instances, 1024 by default): when ``n`` would need more, each shard grows to
    ``ceil(n / max_shards)`` items instead of the run failing. Raises ``ValueError`` for a
    ``shard_size`` or ``max_shards`` under 1.
    """
    check_shard_size(shard_size, max_shards)
    if max_shards is not None:
        shard_size = max(shard_size, math.ceil(n / max_shards))
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def check_shard_size(shard_size: int, max_shards: int | None = None) -> None:
    """Raise ``ValueError`` for a ``shard_size`` or ``max_shards`` under 1 (before any work starts)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"max_shards must be at least 1, got {max_shards}")
