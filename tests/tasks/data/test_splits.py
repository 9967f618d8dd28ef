"""Stratified, seed-determined splits that never move a stem once it is assigned."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.data import splits
from tasks.core.manifest import MANIFEST_COLUMNS, read_table, to_frame, write_table
from tasks.data.splits import SplitConfig, assign_splits, split_summary
from tasks.dev.synth import PRODUCT_TYPES

# Cluster sizes of a ~300-stem dataset: common and rare product types.
SIZES = {"long_pants": 70, "shorts": 40, "short_sleeved": 80, "long_sleeved": 60,
         "beachwear_accessories": 20, "light_coloured": 30}


def _manifest(sizes: dict[str, int], prefix: str = "sku", quarantined: int = 0) -> pd.DataFrame:
    rows = [
        {"stem": f"{prefix}-{cluster}-{i:04d}", "key": f"{prefix}-{cluster}-{i:04d}", "status": "ok",
         "cluster": cluster}
        for cluster, n in sizes.items()
        for i in range(n)
    ]
    rows += [{"stem": f"bad-{i}", "key": f"bad-{i}", "status": "quarantined", "reason": "undecodable"}
             for i in range(quarantined)]
    return to_frame(rows, MANIFEST_COLUMNS)


def _with(manifest: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    out = manifest.copy()
    out["split"] = split
    return out


def test_config_is_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(train=0.8, val=0.2, test=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        SplitConfig(train=1.1, val=-0.1, test=0.0)
    assert SplitConfig(train=0.7, val=0.15, test=0.15).fractions() == (0.7, 0.15, 0.15)


def test_fractions_hold_per_cluster_and_only_ok_rows_get_a_split():
    manifest = _manifest(SIZES, quarantined=7)
    split = assign_splits(manifest, SplitConfig())
    assert split.index.equals(manifest.index) and split.name == "split"
    ok = manifest["status"] == "ok"
    assert split[ok].isin(["train", "val", "test"]).all()
    assert split[~ok].isna().all()
    summary = split_summary(_with(manifest, split))
    assert sorted(summary.index) == sorted(PRODUCT_TYPES)
    for cluster, n in SIZES.items():
        row = summary.loc[cluster]
        assert row["total"] == n
        assert abs(row["train"] - 0.8 * n) <= 1, (cluster, row.to_dict())
        assert abs(row["val"] - 0.1 * n) <= 1 and abs(row["test"] - 0.1 * n) <= 1, (cluster, row.to_dict())


def test_same_seed_same_splits_other_seed_differs():
    manifest = _manifest(SIZES)
    first = assign_splits(manifest, SplitConfig(seed=3))
    shuffled = manifest.sample(frac=1.0, random_state=1)
    again = assign_splits(shuffled, SplitConfig(seed=3))
    assert again.reindex(first.index).equals(first)  # row order does not matter either
    other = assign_splits(manifest, SplitConfig(seed=4))
    moved = (other != first).sum()
    assert moved > 20
    assert split_summary(_with(manifest, other))[["train", "val", "test"]].equals(
        split_summary(_with(manifest, first))[["train", "val", "test"]]
    )  # another seed picks other stems, in the same numbers


def test_a_later_version_with_previous_never_moves_an_old_stem():
    old = _manifest(SIZES)
    old["split"] = assign_splits(old, SplitConfig(seed=0))
    added = _manifest({c: 100 // len(SIZES) + (c == "shorts") * (100 % len(SIZES)) for c in SIZES}, prefix="new")
    assert len(added) == 100
    later = pd.concat([old.drop(columns="split"), added], ignore_index=True)
    later = later.sample(frac=1.0, random_state=5).reset_index(drop=True)
    split = assign_splits(later, SplitConfig(seed=0), previous=old[["stem", "split"]])
    by_stem = dict(zip(later["stem"], split, strict=True))
    assert all(by_stem[s] == p for s, p in zip(old["stem"], old["split"], strict=True))
    # the new stems keep the clusters at their fractions
    summary = split_summary(_with(later, split))
    for cluster, row in summary.iterrows():
        assert abs(row["train"] - 0.8 * row["total"]) <= 1.5, (cluster, row.to_dict())


def test_without_previous_the_hash_order_keeps_most_stems():
    old = _manifest(SIZES)
    before = dict(zip(old["stem"], assign_splits(old, SplitConfig()), strict=True))
    later = pd.concat([old, _manifest({c: 17 for c in SIZES}, prefix="new")], ignore_index=True)
    after = dict(zip(later["stem"], assign_splits(later, SplitConfig()), strict=True))
    kept = sum(after[s] == split for s, split in before.items())
    assert kept >= 0.9 * len(before), kept


def test_previous_split_is_kept_even_against_the_quota_and_when_the_cluster_changes():
    manifest = _manifest({"shorts": 10})
    previous = pd.DataFrame({"stem": ["sku-shorts-0000", "sku-shorts-0001", "sku-gone"],
                             "split": ["test", "test", "val"]})
    manifest.loc[manifest["stem"] == "sku-shorts-0001", "cluster"] = "long_pants"  # a reviewer moved it
    split = assign_splits(manifest, SplitConfig(), previous=previous)
    by_stem = dict(zip(manifest["stem"], split, strict=True))
    assert by_stem["sku-shorts-0000"] == by_stem["sku-shorts-0001"] == "test"
    assert sum(v == "test" for v in by_stem.values()) == 2  # the kept test member fills the quota


def test_no_stem_in_two_splits_and_inconsistent_inputs_are_refused():
    manifest = _manifest(SIZES)
    split = assign_splits(manifest, SplitConfig())
    assert _with(manifest, split).groupby("stem")["split"].nunique().max() == 1
    with pytest.raises(ValueError, match="unique"):
        assign_splits(pd.concat([manifest, manifest.head(1)], ignore_index=True), SplitConfig())
    twice = pd.DataFrame({"stem": ["a", "a"], "split": ["train", "test"]})
    with pytest.raises(ValueError, match="two splits"):
        assign_splits(manifest, SplitConfig(), previous=twice)


@pytest.mark.parametrize("n", [3, 5])
def test_small_cluster_gets_val_and_test(n):
    manifest = _manifest({"beachwear_accessories": n, "long_pants": 50})
    split = assign_splits(manifest, SplitConfig())
    small = split[manifest["cluster"] == "beachwear_accessories"]
    assert {"val", "test"} <= set(small), small.tolist()
    assert (small == "train").sum() == n - 2


def test_rows_without_cluster_are_one_stratum():
    manifest = _manifest({"x": 20})
    manifest["cluster"] = pd.NA
    split = assign_splits(manifest, SplitConfig())
    assert split.value_counts().to_dict() == {"train": 16, "val": 2, "test": 2}


def test_summary_table_text():
    manifest = _manifest(SIZES)
    text = splits.format_split_summary(split_summary(_with(manifest, assign_splits(manifest, SplitConfig()))))
    lines = text.splitlines()
    assert lines[1].split() == ["cluster", "train", "val", "test", "total"]
    assert lines[-1].split()[0] == "total" and int(lines[-1].split()[-1]) == sum(SIZES.values())
    assert any(line.split()[0] == "beachwear_accessories" for line in lines)


def test_split_dataset_writes_the_manifest_and_keeps_previous(tmp_path):
    first_url, second_url = str(tmp_path / "v1"), str(tmp_path / "v2")
    write_table(_manifest(SIZES, quarantined=2), f"{first_url}/manifest.parquet")
    first = splits.split_dataset(first_url, SplitConfig())
    assert first["totals"]["train"] + first["totals"]["val"] + first["totals"]["test"] == sum(SIZES.values())
    v1 = read_table(first["manifest_url"])
    assert list(v1.columns) == list(MANIFEST_COLUMNS)
    later = pd.concat([v1.drop(columns="split"), _manifest({"shorts": 30}, prefix="new")], ignore_index=True)
    write_table(to_frame(later.astype(object).where(later.notna(), None).to_dict("records"), MANIFEST_COLUMNS),
                f"{second_url}/manifest.parquet")
    second = splits.split_dataset(second_url, SplitConfig(), previous_url=first["manifest_url"])
    assert second["kept_from_previous"] == sum(SIZES.values())
    v2 = read_table(second["manifest_url"]).set_index("stem")
    old = v1[v1["status"] == "ok"].set_index("stem")["split"]
    assert (v2.loc[old.index, "split"] == old).all()


def test_splitting_again_moves_no_pair_unless_asked(tmp_path):
    """A version split again (other fractions, an earlier version to keep) keeps its own assignments:
    a pair once in test never lands in train. keep_own=False splits anew."""
    first_url, second_url = str(tmp_path / "v1"), str(tmp_path / "v2")
    write_table(_manifest(SIZES), f"{first_url}/manifest.parquet")
    v1 = read_table(splits.split_dataset(first_url, SplitConfig())["manifest_url"])
    later = pd.concat([v1.drop(columns="split"), _manifest({"shorts": 30}, prefix="new")], ignore_index=True)
    write_table(to_frame(later.astype(object).where(later.notna(), None).to_dict("records"), MANIFEST_COLUMNS),
                f"{second_url}/manifest.parquet")
    v2 = read_table(splits.split_dataset(second_url, SplitConfig(), previous_url=f"{first_url}/manifest.parquet")
                    ["manifest_url"]).set_index("stem")
    others = SplitConfig(train=0.5, val=0.25, test=0.25, seed=9)
    again = splits.split_dataset(second_url, others, previous_url=f"{first_url}/manifest.parquet")
    assert again["kept_from_previous"] == len(v2)  # v1's pairs from v1, the new ones from v2 itself
    assert (read_table(again["manifest_url"]).set_index("stem").loc[v2.index, "split"] == v2["split"]).all()
    fresh = read_table(splits.split_dataset(second_url, others, keep_own=False)["manifest_url"]).set_index("stem")
    assert (fresh.loc[v2.index, "split"] != v2["split"]).any()
