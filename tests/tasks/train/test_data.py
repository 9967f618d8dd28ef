"""Tests for ``tasks.train.config`` and ``tasks.train.data``: config round-trips, the manifest
reader and pair cache, the dataset's tensors, and the cluster-balanced distributed sampler."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.core import storage
from tasks.core.manifest import MANIFEST_COLUMNS, read_table, to_frame, write_table
from tasks.train.config import TrainConfig
from tasks.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClusterBalancedDistributedSampler,
    SegmentationDataset,
    ShardSampler,
    load_samples,
    prepare_split,
)
from tasks.dev.synthetic import write_synthetic_dataset

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- config

def test_config_round_trips_through_json() -> None:
    config = TrainConfig(dataset_url="s3://b/datasets/v1", output_url="s3://b/runs/r1", model="U2-NetP",
                         batch_size="auto", schedule="onecycle", amp="bf16", channels_last=True,
                         model_widths={"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5},
                         storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    data = json.loads(json.dumps(config.to_dict()))
    again = TrainConfig.from_dict(data)
    assert again == config
    assert again.model == "u2netp"
    assert TrainConfig.from_json(config.to_json()) == config
    assert again.model_config().encoder[0].out == 8


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "u2netpp"}, "did you mean 'u2netp'"),
        ({"batch_size": "big"}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"amp": "fp8"}, "amp must be one of"),
        ({"schedule": "cosin"}, "did you mean 'cosine'"),
        ({"input_size": 16}, "at least 32"),
        ({"model_widths": {"encoder": [[4, 8]]}}, "model_widths must be"),
    ],
)
def test_config_rejects_bad_values_with_a_hint(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(dataset_url="d", output_url="o", **changes)


def test_config_from_dict_names_unknown_fields() -> None:
    with pytest.raises(ValueError, match="'epoch'.*did you mean 'epochs'"):
        TrainConfig.from_dict({"dataset_url": "d", "output_url": "o", "epoch": 3})
    assert TrainConfig.from_dict({"dataset_url": "d", "output_url": "o", "batch_size": "16"}).batch_size == 16


# ---------------------------------------------------------------------------------- manifest and cache

def _write_manifest_only(url: str, rows: list[dict]) -> None:
    write_table(to_frame(rows, MANIFEST_COLUMNS), storage.join(url, "manifest.parquet"))


def test_prepare_split_downloads_each_remote_file_once(tmp_path, monkeypatch) -> None:
    url = f"memory://bgremoval-test-{uuid.uuid4().hex[:8]}/datasets/v1"
    splits = {0: "train", 1: "val", 2: None, 3: "test", 4: "train", 5: "train"}
    write_synthetic_dataset(url, 6, seed=2, max_side=48, split_for=splits.get,
                            cluster_for=lambda i, t: None if i == 4 else t, quarantined=[5])
    reads: list[str] = []
    real_read = storage.read_bytes

    def counting_read(u: str, options=None) -> bytes:
        reads.append(u)
        return real_read(u, options)

    monkeypatch.setattr(storage, "read_bytes", counting_read)
    cache = tmp_path / "cache"
    train = prepare_split(url, "train", str(cache))
    # Items 0 and 4 are train, 2 has a null split (train); 5 is quarantined; sorted by key.
    assert [s.key for s in train] == ["sku-2-00000", "sku-2-00002", "sku-2-00004"]
    assert train[2].cluster == "all"
    assert all(s.image_path.startswith(str(cache)) for s in train)
    file_reads = [u for u in reads if not u.endswith(".parquet")]
    assert len(file_reads) == 6  # 3 images + 3 masks
    assert prepare_split(url, "val", str(cache))[0].key == "sku-2-00001"

    reads.clear()
    again = prepare_split(url, "train", str(cache))
    assert again == train
    assert [u for u in reads if not u.endswith(".parquet")] == []  # everything came from the cache


def test_local_dataset_is_used_in_place_and_augmented_rows_join_train(tmp_path) -> None:
    root = tmp_path / "v1"
    rows = write_synthetic_dataset(str(root), 3, seed=4, max_side=48)
    augmented = []
    for row in rows[:2]:
        extra = dict(row, key=f"{row['key']}-aug", stem=f"{row['stem']}-aug", split="train")
        augmented.append(extra)
    write_table(to_frame(augmented, MANIFEST_COLUMNS), str(root / "augmented" / "manifest.parquet"))

    samples = prepare_split(str(root), "train", str(tmp_path / "cache"))
    assert len(samples) == 5
    assert not (tmp_path / "cache").exists()  # local files are not copied
    assert samples[0].image_path == rows[0]["image_url"]
    assert len(prepare_split(str(root), "train", str(tmp_path / "cache"), include_augmented=False)) == 3
    assert load_samples(str(root), "val") == []


def test_missing_manifest_is_an_actionable_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset version folder"):
        prepare_split(str(tmp_path / "nothing"), "train", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------- dataset

def test_dataset_normalises_resizes_and_flips(tmp_path) -> None:
    rows = write_synthetic_dataset(str(tmp_path / "v1"), 3, seed=5, max_side=80)
    samples = prepare_split(str(tmp_path / "v1"), "train", str(tmp_path / "cache"))
    pick = next(i for i, row in enumerate(rows) if row["height"] != row["width"])  # 80×60
    plain = SegmentationDataset(samples[pick:pick + 1], 64, train=False)
    image, mask = plain[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (1, 64, 64) and 0.0 <= float(mask.min()) and float(mask.max()) <= 1.0
    # ImageNet normalisation: a pure-white pixel maps to (1 - mean) / std.
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert float(image.max()) <= float(white.max()) + 1e-4
    # The foreground share survives the stretch to a square (up to resampling of the edges).
    assert abs(float((mask > 0.5).float().mean()) - rows[pick]["fg_fraction"]) < 0.03

    letterbox = SegmentationDataset(samples[pick:pick + 1], 64, train=False, resize="letterbox")
    boxed_image, boxed_mask = letterbox[0]
    height, width = rows[pick]["height"], rows[pick]["width"]
    if height > width:  # padded left and right with the mean colour (0 after normalisation) and mask 0
        assert float(boxed_image[:, :, 0].abs().max()) == 0.0 and float(boxed_mask[:, :, 0].max()) == 0.0
    else:
        assert float(boxed_image[:, 0, :].abs().max()) == 0.0 and float(boxed_mask[:, 0, :].max()) == 0.0

    flipping = SegmentationDataset(samples[pick:pick + 1], 64, train=True)
    torch.manual_seed(0)
    draws = [flipping[0] for _ in range(12)]
    flipped = [torch.equal(i, torch.flip(image, dims=[2])) and torch.equal(m, torch.flip(mask, dims=[2]))
               for i, m in draws]
    same = [torch.equal(i, image) and torch.equal(m, mask) for i, m in draws]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert any(flipped) and any(same)


def test_dataset_reports_an_unreadable_file(tmp_path) -> None:
    write_synthetic_dataset(str(tmp_path / "v1"), 1, seed=6, max_side=48)
    samples = prepare_split(str(tmp_path / "v1"), "train", str(tmp_path / "cache"))
    with open(samples[0].image_path, "wb") as handle:
        handle.write(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        SegmentationDataset(samples, 64)[0]


# ---------------------------------------------------------------------------------- sampler

def _clusters() -> list[str | None]:
    # Unbalanced: 60 shirts, 25 pants, 10 shorts, 5 with no cluster.
    return ["shirt"] * 60 + ["pants"] * 25 + ["shorts"] * 10 + [None] * 5


def test_sampler_splits_each_epoch_across_ranks_without_overlap() -> None:
    clusters = _clusters()
    world = 3
    samplers = [ClusterBalancedDistributedSampler(clusters, world, rank, seed=7) for rank in range(world)]
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in samplers]
        assert {len(p) for p in per_rank} == {len(samplers[0])} == {34}  # ceil(100 / 3)
        whole = samplers[0].global_indices()
        assert len(whole) == 102
        # Disjoint positions of one sequence that together make up all of it.
        for rank, part in enumerate(per_rank):
            assert part == whole[rank::world]
        interleaved = [per_rank[p % world][p // world] for p in range(len(whole))]
        assert interleaved == whole


def test_sampler_ranks_get_disjoint_samples_when_no_cluster_needs_repeating() -> None:
    clusters = ["a"] * 8 + ["b"] * 8 + ["c"] * 8
    parts = []
    for rank in range(2):
        sampler = ClusterBalancedDistributedSampler(clusters, 2, rank, seed=1)
        sampler.set_epoch(3)
        parts.append(list(sampler))
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(24))


def test_sampler_balances_clusters_and_is_deterministic_per_epoch() -> None:
    clusters = _clusters()
    sampler = ClusterBalancedDistributedSampler(clusters, 2, 0, seed=3, num_samples=4000)
    other = ClusterBalancedDistributedSampler(clusters, 2, 0, seed=3, num_samples=4000)
    sampler.set_epoch(5)
    other.set_epoch(5)
    first = list(sampler)
    assert first == list(other) == list(sampler)  # same (seed, epoch) → same order
    other.set_epoch(6)
    assert list(other) != first
    assert list(ClusterBalancedDistributedSampler(clusters, 2, 0, seed=4, num_samples=4000)) != list(
        ClusterBalancedDistributedSampler(clusters, 2, 0, seed=3, num_samples=4000))

    names = ["all" if c is None else c for c in clusters]
    counts = Counter(names[i] for i in first)
    share = {name: counts[name] / len(first) for name in set(names)}
    assert all(abs(s - 0.25) < 0.02 for s in share.values()), share
    # Within a cluster, members are drawn evenly (each cycle is a permutation of the cluster).
    shirt_counts = Counter(i for i in sampler.global_indices() if names[i] == "shirt")
    assert max(shirt_counts.values()) - min(shirt_counts.values()) <= 1
    # Per-sample weights are inverse to the cluster frequency and sum to one.
    weights = sampler.weights
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[0] * 60) == pytest.approx(float(weights[-1] * 5))


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        ClusterBalancedDistributedSampler([], 1, 0)
    with pytest.raises(ValueError, match="rank"):
        ClusterBalancedDistributedSampler(["a"], 2, 2)


def test_shard_sampler_covers_every_sample_once() -> None:
    shards = [list(ShardSampler(7, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert [len(s) for s in shards] == [3, 2, 2]


def test_null_clusters_in_pandas_count_as_all() -> None:
    frame = pd.Series(["a", None, np.nan, "a"], dtype="object")
    sampler = ClusterBalancedDistributedSampler(list(frame), 1, 0)
    assert sampler.cluster_names == ["a", "all"]


def test_flagged_masks_stay_out_of_training_until_kept_or_fixed(tmp_path) -> None:
    root = tmp_path / "v1"
    write_synthetic_dataset(str(root), 4, seed=4, max_side=48)
    manifest = read_table(str(root / "manifest.parquet"))
    manifest["audit_reasons"] = ["", "speckle", "holes,edges", "ragged"]
    manifest["audit_decision"] = ["", "", "keep", "fixed"]
    write_table(manifest, str(root / "manifest.parquet"))
    keys = list(manifest["key"])
    assert [k for k, *_ in load_samples(str(root), "train")] == sorted([keys[0], keys[2], keys[3]])
    assert [k for k, *_ in load_samples(str(root), "train", audit="only")] == [keys[1]]
    assert len(load_samples(str(root), "train", audit="all")) == 4
    assert len(prepare_split(str(root), "train", str(tmp_path / "cache"))) == 3
    with pytest.raises(ValueError, match="audit must be one of"):
        load_samples(str(root), "train", audit="some")
