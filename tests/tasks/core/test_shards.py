"""Shards cover the work exactly once, and grow rather than exceed the mapped-task limit."""

from __future__ import annotations

import pytest

from tasks.core.shards import check_shard_size, shard_ranges


def test_shards_cover_every_item_once_in_order():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(0, 4) == []
    assert shard_ranges(3, 100) == [(0, 3)]


def test_more_items_than_the_limit_allows_grow_each_shard():
    ranges = shard_ranges(5000, 2, max_shards=1024)
    assert len(ranges) <= 1024 and ranges[0] == (0, 5) and ranges[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert shard_ranges(10, 4, max_shards=1024) == shard_ranges(10, 4)  # under the limit: unchanged


@pytest.mark.parametrize(("size", "limit"), [(0, None), (-1, None), (4, 0)])
def test_bad_sizes_are_refused(size, limit):
    with pytest.raises(ValueError):
        shard_ranges(10, size, limit)
    with pytest.raises(ValueError):
        check_shard_size(size, limit)
