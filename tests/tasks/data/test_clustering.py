"""Clustering a generated catalogue: agreement with the true product types, artefacts, names."""

from __future__ import annotations

import json
import logging
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.data import clustering, features, ingest
from tasks.core import storage
from tasks.data.cleaning import CleaningConfig
from tasks.data.clustering import (
    ClusteringConfig,
    ReviewLinks,
    cluster_dataset,
    format_clusters,
    propose_clusters,
    propose_names,
    review_request,
)
from tasks.core.manifest import read_table
from tasks.dev.synth import PRODUCT_TYPES, SynthConfig, generate_catalogue

N_PAIRS = 200
SEED = 7


def _dataset(root: str, n: int, seed: int) -> str:
    """Generate, plan, clean and finalize a catalogue under ``root``; return the dataset URL."""
    generate_catalogue(storage.join(root, "raw", "b"), SynthConfig(n=n, seed=seed, max_side=400))
    config = CleaningConfig()
    plan = ingest.plan_batch(root, "b", config, shard_size=100)
    results = [ingest.clean_shard(u, plan["dataset_url"], "b", config) for u in plan["shard_urls"]]
    ingest.finalize_dataset(plan["dataset_url"], "b", [r["result_url"] for r in results], plan["listing_rejects_url"])
    return plan["dataset_url"]


def _features(dataset_url: str, shard_size: int = 80) -> list[str]:
    plan = features.plan_feature_shards(dataset_url, shard_size=shard_size)
    return [features.extract_shard_features(**p)["features_url"] for p in plan]


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> dict:
    """A 200-pair catalogue, cleaned, featurised in three shards and clustered with k = 6."""
    root = str(tmp_path_factory.mktemp("catalogue"))
    dataset_url = _dataset(root, N_PAIRS, SEED)
    feature_urls = _features(dataset_url)
    truth_url = storage.join(root, "raw", "b", "truth.csv")
    summary = cluster_dataset(dataset_url, feature_urls, ClusteringConfig(k=6, seed=0), truth_url=truth_url)
    return {"root": root, "dataset_url": dataset_url, "feature_urls": feature_urls, "truth_url": truth_url,
            "summary": summary}


def _copy_dataset(clustered: dict, tmp_path) -> tuple[str, list[str]]:
    """A copy of the dataset folder (its manifest still points at the original clean pairs)."""
    copy = str(tmp_path / "copy")
    shutil.copytree(clustered["dataset_url"], copy)
    urls = [u.replace(clustered["dataset_url"], copy) for u in clustered["feature_urls"]]
    return copy, urls


def test_clusters_agree_with_the_true_product_types(clustered) -> None:
    summary = clustered["summary"]
    print(f"\nseed {SEED}, {N_PAIRS} pairs: adjusted Rand index {summary['adjusted_rand_index']:.3f}, "
          f"purity {summary['purity']:.3f}, names right for {summary['name_agreement']:.1%}")
    print(format_clusters(summary))
    assert summary["adjusted_rand_index"] >= 0.6
    assert summary["purity"] >= 0.75
    assert summary["name_agreement"] >= 0.6


def test_assignments_cover_every_ok_row_once_and_sizes_add_up(clustered) -> None:
    summary, dataset_url = clustered["summary"], clustered["dataset_url"]
    ok = features.ok_rows(dataset_url)
    assignments = read_table(summary["assignments_url"])
    assert list(assignments.columns) == ["stem", "key", "cluster", "proposed_name", "distance"]
    assert assignments["stem"].is_unique
    assert sorted(assignments["stem"]) == sorted(ok["stem"])
    assert set(assignments["cluster"]) == set(range(6))
    assert (assignments["distance"] >= 0).all()

    document = json.loads(storage.read_bytes(summary["clusters_url"]))
    assert sum(c["size"] for c in document["clusters"]) == len(ok) == summary["n"]
    assert document["config"] == {"k": 6, "seed": 0, "n_init": 10}
    assert document["adjusted_rand_index"] == summary["adjusted_rand_index"]
    for entry in document["clusters"]:
        members = assignments[assignments["cluster"] == entry["cluster"]]
        assert len(members) == entry["size"] == summary["sizes"][str(entry["cluster"])]
        assert set(members["proposed_name"]) == {entry["proposed_name"]}
        assert {"aspect", "leg_gap", "sleeve_spread", "lightness", "saturation", "area_fraction"} <= set(entry["stats"])
        assert sum(entry["truth_counts"].values()) == entry["size"]
    sizes = [c["size"] for c in document["clusters"]]
    assert sizes == sorted(sizes, reverse=True)  # cluster 0 is the largest


def test_names_are_the_six_product_types_once_each(clustered) -> None:
    names = clustered["summary"]["names"]
    assert sorted(names.values()) == sorted(PRODUCT_TYPES)


def test_one_contact_sheet_per_cluster_decodes_as_jpeg(clustered) -> None:
    summary = clustered["summary"]
    assert set(summary["sheet_urls"]) == set(summary["sizes"])
    for cluster, url in summary["sheet_urls"].items():
        data = storage.read_bytes(url)
        assert data[:2] == b"\xff\xd8" and url.endswith(f"/clusters/sheet-{cluster}.jpg")
        sheet = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        tiles = min(summary["sizes"][cluster], clustering.SHEET_MAX_TILES)
        rows = -(-tiles // min(tiles, clustering.SHEET_COLUMNS))
        assert sheet is not None and sheet.shape[0] >= rows * clustering.TILE


def test_summary_fits_an_xcom_and_reads_back_from_json(clustered) -> None:
    summary = clustered["summary"]
    text = json.dumps(summary)
    assert len(text) < 4096
    assert json.loads(text) == summary
    table = format_clusters(json.loads(text))
    assert "ARI" in table and all(name in table for name in PRODUCT_TYPES)


def test_same_seed_gives_the_same_clusters(clustered, tmp_path) -> None:
    copy, urls = _copy_dataset(clustered, tmp_path)
    again = cluster_dataset(copy, list(reversed(urls)), ClusteringConfig(k=6, seed=0))
    first = read_table(clustered["summary"]["assignments_url"])
    second = read_table(again["assignments_url"])
    pd.testing.assert_frame_equal(first, second)
    assert again["names"] == clustered["summary"]["names"]
    assert again["adjusted_rand_index"] is None and again["purity"] is None


def test_other_k_repeats_names_with_a_suffix_and_drops_stale_sheets(clustered, tmp_path) -> None:
    copy, urls = _copy_dataset(clustered, tmp_path)
    eight = cluster_dataset(copy, urls, ClusteringConfig(k=8, seed=1))
    names = list(eight["names"].values())
    assert len(names) == 8 and len(set(names)) == 8
    assert set(PRODUCT_TYPES) <= set(names)
    assert all(n in PRODUCT_TYPES or n.rsplit("-", 1)[0] in PRODUCT_TYPES for n in names)
    three = cluster_dataset(copy, urls, ClusteringConfig(k=3, seed=1))
    assert len(set(three["names"].values())) == 3
    listing = storage.list_objects(storage.join(copy, "clusters"))
    sheets = sorted(o.relpath for o in listing if o.relpath.startswith("sheet-"))
    assert sheets == ["sheet-0.jpg", "sheet-1.jpg", "sheet-2.jpg"]


def test_truth_is_compared_only_on_shared_stems(clustered) -> None:
    assignments = read_table(clustered["summary"]["assignments_url"])
    truth = clustering.read_truth(clustered["truth_url"])
    extra = pd.DataFrame({"stem": ["not-in-the-dataset"], "product_type": ["shorts"]})
    scores = clustering.agreement(assignments.iloc[:50], pd.concat([truth, extra]))
    assert scores["n_compared"] == 50
    assert clustering.agreement(assignments, extra)["adjusted_rand_index"] is None


def test_bad_input_rows_with_empty_type_are_ignored(tmp_path) -> None:
    url = str(tmp_path / "truth.csv")
    storage.write_text(url, "stem,product_type,expected_reason\na,shorts,\nbad-1,,missing_mask\n")
    assert clustering.read_truth(url).to_dict("records") == [{"stem": "a", "product_type": "shorts"}]


def test_a_pair_unreadable_after_features_gets_a_placeholder_tile(tmp_path, caplog) -> None:
    root = str(tmp_path / "small")
    dataset_url = _dataset(root, 12, seed=2)
    urls = _features(dataset_url, shard_size=5)
    victim = features.ok_rows(dataset_url).iloc[0]
    storage.write_bytes(victim["image_url"], b"garbage")
    with caplog.at_level(logging.WARNING, logger="tasks.data.clustering"):
        summary = cluster_dataset(dataset_url, urls, ClusteringConfig(k=3, seed=0))
    assert summary["n"] == 12 and len(summary["sheet_urls"]) == 3
    assert f"cannot draw {victim['stem']}" in caplog.text
    # and a re-extraction skips it, so the next clustering runs without it
    rerun = _features(dataset_url, shard_size=5)
    assert cluster_dataset(dataset_url, rerun, ClusteringConfig(k=3, seed=0))["n"] == 11


def test_prototype_statistics_get_their_own_names() -> None:
    defaults = {"aspect": 1.0, "leg_gap": 0.0, "sleeves_apart": 0.0, "sleeve_spread": 1.0,
                "lightness": 0.45, "saturation": 0.5, "frame_span": 0.8}
    stats = {i: {**defaults, **clustering.NAME_PROTOTYPES[name]} for i, name in enumerate(reversed(PRODUCT_TYPES))}
    assert propose_names(stats) == dict(enumerate(reversed(PRODUCT_TYPES)))
    stats[6] = {**stats[0], "lightness": 0.8}
    stats[7] = {**stats[0], "aspect": float("nan")}
    named = propose_names(stats)
    assert named[6] == f"{named[0]}-2" and named[7] == "cluster-7"


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        ClusteringConfig(k=0)
    with pytest.raises(ValueError):
        ClusteringConfig(n_init=0)
    with pytest.raises(ValueError, match="no features"):
        clustering.load_features([])


def test_the_cluster_stage_writes_the_reviewers_request(clustered, tmp_path) -> None:
    copy, urls = _copy_dataset(clustered, tmp_path)
    dataset = {"dataset_url": copy, "clean": 200, "audit_flagged": 3, "audit_reasons": {"speckle": 2, "holes": 1}}
    links = ReviewLinks("http://ui/review/v", "http://ui/review/v/masks")
    summary = propose_clusters(dataset, urls, ClusteringConfig(k=6, seed=0), "b", links,
                               truth_url=str(tmp_path / "no-truth.csv"))
    text = summary["review_markdown"]
    assert summary["adjusted_rand_index"] is None
    assert "**200 clean images** of batch `b`" in text and "[review page](http://ui/review/v)" in text
    # one Markdown list item per cluster: Required Actions joins a code block's lines into one
    items = [line for line in text.splitlines() if line.startswith("- cluster ")]
    assert items == [f"- cluster {c}: **{summary['names'][c]}**, {summary['sizes'][c]} images"
                     for c in sorted(summary["sizes"], key=int)] and "```" not in text
    assert "**3 masks look broken** (speckle 2, holes 1)" in text and "(http://ui/review/v/masks)" in text
    one = review_request(summary, {**dataset, "audit_flagged": 1, "audit_reasons": {"ragged": 1}}, "b", links)
    assert "**1 mask looks broken** (ragged 1): it stays out of training" in one
    quiet = review_request(summary, {**dataset, "audit_flagged": 0}, "b", links)
    assert "masks look broken" not in quiet
