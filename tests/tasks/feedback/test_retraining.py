"""The data half of the retraining loop, on a local folder and on a real S3 API (moto_server).

A base version comes from ``write_synthetic_dataset`` (clusters = product types, a train/val/test
split); pool pairs are rendered products put in the pool with ``add_to_pool`` (or, for files the
pool itself would refuse, written beside it by hand).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.feedback import queue as c
from tasks.feedback import retraining as r
from tasks.core import storage
from tasks.data.augment import AugmentConfig, plan_augmentation
from tasks.data.cleaning import sha256
from tasks.data.clustering import weighted_matrix
from tasks.data.features import FEATURE_NAMES, extract_shard_features, plan_feature_shards
from tasks.core.manifest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS, read_table, to_frame, write_table
from tasks.data.splits import stem_uniform
from tasks.dev.synth import SynthConfig, encode_jpeg, encode_png, render_item
from tasks.train.data import load_samples
from tasks.dev.synthetic import write_synthetic_dataset

BASE = "base-v1"
N_BASE = 36
POOL_SEED = 5
SIDE = 240


def base_split(index: int) -> str:
    return ("train", "train", "val", "test")[index % 4]


def write_base(bucket_url: str, options: dict | None, version: str = BASE, **kwargs) -> pd.DataFrame:
    """A base version whose rows also carry the image SHA-256 ingest records (of the clean file here)."""
    url = storage.join(bucket_url, "datasets", version)
    kwargs.setdefault("split_for", base_split)
    rows = write_synthetic_dataset(url, N_BASE, seed=0, max_side=SIDE, storage_options=options, **kwargs)
    for row in rows:
        row["image_sha256"] = sha256(storage.read_bytes(row["image_url"], options))
    frame = to_frame(rows, MANIFEST_COLUMNS)
    write_table(frame, storage.join(url, "manifest.parquet"), options)
    return frame


def pool_item(index: int, seed: int = POOL_SEED):
    return render_item(index, SynthConfig(n=index + 1, seed=seed, max_side=SIDE))


def add_item(bucket_url, options, pair_id, item, at, origin="published", mask=None):
    meta = c.PoolMeta(origin=origin, source_url=f"{bucket_url}/incoming/b/{pair_id}.jpg", at=at)
    c.add_to_pool(bucket_url, pair_id, encode_jpeg(item.image), encode_png(item.mask if mask is None else mask),
                  meta, options)


def stamp(i: int) -> str:
    return f"2026-03-01T10:00:{i:02d}.000000+00:00"


def listing(url: str, options) -> dict[str, tuple[int, str]]:
    return {o.relpath: (o.size, o.etag) for o in storage.list_objects(url, options)}


def content(url: str, options) -> dict[str, str]:
    return {o.relpath: sha256(storage.read_bytes(o.url, options)) for o in storage.list_objects(url, options)}


# --------------------------------------------------------------------------------------------


def test_config_is_validated():
    assert r.RetrainingConfig().to_dict() == {"min_new_pairs": 50, "working_size": 320, "val_fraction": 0.1, "seed": 0}
    assert r.RetrainingConfig().cleaning_config().working_size == 320
    for bad in ({"min_new_pairs": 0}, {"min_new_pairs": 2.5}, {"working_size": 16}, {"val_fraction": 1.0},
                {"val_fraction": -0.1}, {"seed": 1.5}, {"min_new_pairs": True}, {"min_new_pairs": None},
                {"val_fraction": "0.1"}):
        with pytest.raises(ValueError):
            r.RetrainingConfig(**bad)


def test_state_round_trip_and_new_pool_pairs_are_the_unconsumed_ones(bucket):
    bucket_url, options = bucket
    state = r.read_state(bucket_url, options)
    assert state == {"last_pair_at": None, "last_dataset_version": None, "history": [], "consumed": {}}
    item = pool_item(0)
    for i in range(3):
        add_item(bucket_url, options, f"b--p{i}", item, stamp(i))
    assert [p["pair_id"] for p in r.new_pool_pairs(bucket_url, state, options)] == ["b--p0", "b--p1", "b--p2"]

    result = {"version": "retrain-x", "base_version": BASE, "n_new": 2, "n_new_ok": 2, "n_quarantined": 0,
              "last_pair_at": stamp(1), "consumed": {"b--p0": stamp(0), "b--p1": stamp(1)}}
    state = r.advance_state(state, result, at="2026-03-02T00:00:00+00:00", training_run_id="run-1")
    r.write_state(bucket_url, state, options)
    back = r.read_state(bucket_url, options)
    assert back == state
    assert back["last_pair_at"] == stamp(1) and back["last_dataset_version"] == "retrain-x"
    assert back["history"] == [{"at": "2026-03-02T00:00:00+00:00", "version": "retrain-x", "base_version": BASE,
                                "n_new": 2, "n_new_ok": 2, "n_quarantined": 0, "last_pair_at": stamp(1),
                                "training_run_id": "run-1"}]
    assert [p["pair_id"] for p in r.new_pool_pairs(bucket_url, back, options)] == ["b--p2"]
    # a pair stamped before the last run's newest pair but visible only now is still new
    add_item(bucket_url, options, "b--late", item, stamp(0))
    assert sorted(p["pair_id"] for p in r.new_pool_pairs(bucket_url, back, options)) == ["b--late", "b--p2"]
    # a used pair rewritten since (a person's correction) is new again
    add_item(bucket_url, options, "b--p1", item, stamp(9), origin="corrected")
    assert sorted(p["pair_id"] for p in r.new_pool_pairs(bucket_url, back, options)) == ["b--late", "b--p1", "b--p2"]
    assert storage.exists(storage.join(bucket_url, "retraining", "state.json"), options)
    with pytest.raises(ValueError):
        r.write_state(bucket_url, {"history": []}, options)


def test_a_state_from_before_consumed_ids_counts_pairs_up_to_its_cursor_as_used(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    for i in range(3):
        add_item(bucket_url, None, f"b--p{i}", pool_item(0), stamp(i))
    legacy = {"last_pair_at": stamp(1), "last_dataset_version": "v", "history": []}
    assert [p["pair_id"] for p in r.new_pool_pairs(bucket_url, legacy)] == ["b--p2"]


def test_build_retraining_dataset(bucket):
    bucket_url, options = bucket
    base = write_base(bucket_url, options)
    base_url = storage.join(bucket_url, "datasets", BASE)

    # 16 good pool pairs (types known), a copy of a base photo, a copy of pool pair 0,
    # a mask covering the whole photo and a mask file that is not an image.
    truth = {}
    for i in range(16):
        item = pool_item(i)
        truth[f"b--p{i:02d}"] = item.product_type
        add_item(bucket_url, options, f"b--p{i:02d}", item, stamp(i))
    base_row = base.iloc[5]
    base_image = storage.read_bytes(base_row["image_url"], options)
    c.add_to_pool(bucket_url, "b--dup-base", base_image, storage.read_bytes(base_row["mask_url"], options),
                  c.PoolMeta(origin="corrected", source_url="x", user="ana", at=stamp(20)), options)
    add_item(bucket_url, options, "b--dup-pool", pool_item(0), stamp(21))
    full = pool_item(1)
    add_item(bucket_url, options, "b--full-mask", full, stamp(22), mask=np.full_like(full.mask, 255))
    broken = c.pool_url(bucket_url, "b--broken")
    storage.write_bytes(storage.join(broken, "image.jpg"), encode_jpeg(pool_item(2).image), options)
    storage.write_bytes(storage.join(broken, "mask.png"), b"not a png at all", options)
    storage.write_text(storage.join(broken, "meta.json"),
                       json.dumps({"pair_id": "b--broken", "origin": "published", "source_url": "x", "at": stamp(23)}),
                       options)

    pool_before = content(storage.join(bucket_url, "retraining-pool"), options)
    base_before = listing(base_url, options)
    base_content = content(base_url, options)

    pairs = r.new_pool_pairs(bucket_url, r.read_state(bucket_url, options), options)
    assert len(pairs) == 20
    config = r.RetrainingConfig(min_new_pairs=10, working_size=SIDE, val_fraction=0.3, seed=3)
    result = r.build_retraining_dataset(bucket_url, BASE, pairs, config, options)

    version = result["version"]
    assert version.startswith("retrain-") and version != BASE
    assert result["dataset_url"] == storage.join(bucket_url, "datasets", version)
    assert result["base_version"] == BASE
    assert (result["n_base"], result["n_new"], result["n_new_ok"], result["n_quarantined"]) == (N_BASE, 20, 16, 4)
    assert result["reasons"] == {"duplicate": 2, "mask_full": 1, "undecodable": 1}
    assert result["quarantined"] == {"b--dup-base": stamp(20), "b--dup-pool": stamp(21),
                                     "b--full-mask": stamp(22), "b--broken": stamp(23)}
    assert result["last_pair_at"] == stamp(23)
    assert result["centroids"] == "pairs"
    assert sum(result["splits"].values()) == N_BASE + 16 and result["splits"]["test"] == N_BASE // 4
    assert result["new_splits"]["test"] == 0
    json.dumps(result)  # fits an XCom

    manifest = read_table(storage.join(result["dataset_url"], "manifest.parquet"), options)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    old = manifest[manifest["batch"] != r.POOL_BATCH].reset_index(drop=True)
    new = manifest[manifest["batch"] == r.POOL_BATCH].set_index("stem")

    # base rows: copied as they were, pointing at the base's files; the test split is the base's
    pd.testing.assert_frame_equal(old, base[base["status"] == "ok"].reset_index(drop=True))
    assert all(u.startswith(base_url + "/clean/") for u in old["image_url"].tolist() + old["mask_url"].tolist())
    test_rows = manifest[manifest["split"] == "test"][["stem", "image_url", "mask_url"]].reset_index(drop=True)
    base_test = base[base["split"] == "test"][["stem", "image_url", "mask_url"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(test_rows, base_test)

    # new pairs: cleaned into the new version, train/val by the stem hash, a plausible cluster
    ok = new[new["status"] == "ok"]
    assert sorted(ok.index) == sorted(truth)
    for stem, row in ok.iterrows():
        assert row["split"] == ("val" if stem_uniform(stem, 3) < 0.3 else "train")
        assert row["image_url"] == storage.join(result["dataset_url"], "clean", "images", f"{stem}.jpg")
        assert storage.exists(row["image_url"], options) and storage.exists(row["mask_url"], options)
        assert row["image_source"] == storage.join(c.pool_url(bucket_url, stem), "image.jpg")
        assert max(int(row["width"]), int(row["height"])) == SIDE
        assert row["cluster"] in set(base["cluster"])
    assert set(ok["split"]) == {"train", "val"}
    long_pants = [s for s, t in truth.items() if t == "long_pants"]
    assert long_pants and all(ok.at[s, "cluster"] == "long_pants" for s in long_pants)
    agree = sum(ok.at[s, "cluster"] == t for s, t in truth.items())
    assert agree >= 0.7 * len(truth), {s: (t, ok.at[s, "cluster"]) for s, t in truth.items()}

    bad = new[new["status"] == "quarantined"]
    assert bad.at["b--dup-base", "reason"] == "duplicate" and base_row["stem"] in bad.at["b--dup-base", "detail"]
    assert bad.at["b--dup-pool", "reason"] == "duplicate" and "b--p00" in bad.at["b--dup-pool", "detail"]
    assert bad.at["b--full-mask", "reason"] == "mask_full"
    assert bad.at["b--broken", "reason"] == "undecodable" and "mask" in bad.at["b--broken", "detail"]
    assert bad["image_url"].isna().all() and bad["split"].isna().all()
    quarantine = read_table(storage.join(result["dataset_url"], "quarantine.parquet"), options)
    assert list(quarantine.columns) == list(QUARANTINE_COLUMNS)
    assert sorted(quarantine["stem"]) == sorted(bad.index)
    new_files = listing(result["dataset_url"], options)
    assert not any(k.endswith(("b--dup-base.jpg", "b--dup-pool.jpg", "b--full-mask.png")) for k in new_files)
    summary = json.loads(storage.read_bytes(storage.join(result["dataset_url"], "summary.json"), options))
    assert summary["version"] == version and summary["config"] == config.to_dict() and len(summary["pair_ids"]) == 20

    # the training side reads it: load_samples per split, augmentation plans on cluster/split
    test_samples = load_samples(result["dataset_url"], "test", options)
    assert test_samples == load_samples(base_url, "test", options)
    train_samples = load_samples(result["dataset_url"], "train", options)
    val_samples = load_samples(result["dataset_url"], "val", options)
    assert len(train_samples) + len(val_samples) + len(test_samples) == N_BASE + 16
    assert {k for k, *_ in train_samples + val_samples} >= set(truth)
    plan = plan_augmentation(manifest, AugmentConfig(target_per_cluster=30))
    assert set(plan) == set(base["cluster"]) and all(n >= 0 for n in plan.values())

    # inputs untouched; the same inputs again give the same version and the same files
    assert listing(base_url, options) == base_before and content(base_url, options) == base_content
    assert content(storage.join(bucket_url, "retraining-pool"), options) == pool_before
    new_content = content(result["dataset_url"], options)
    again = r.build_retraining_dataset(bucket_url, BASE, list(reversed(pairs)), config, options)
    assert again == result
    assert content(result["dataset_url"], options) == new_content
    datasets = {o.relpath.split("/", 1)[0] for o in storage.list_objects(storage.join(bucket_url, "datasets"), options)}
    assert datasets == {BASE, version}
    assert r.retraining_version(BASE, pairs[:-1], config) != version
    assert r.retraining_version(BASE, pairs, r.RetrainingConfig(seed=4)) != r.retraining_version(BASE, pairs, config)


def test_centroids_from_feature_shards_match_the_clustering_space(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    base = write_base(bucket_url, None)
    base_url = storage.join(bucket_url, "datasets", BASE)
    for shard in plan_feature_shards(base_url, shard_size=20):
        extract_shard_features(**shard)
    features = pd.concat([read_table(o.url) for o in storage.list_objects(storage.join(base_url, "features"))])
    frame = features.merge(base[["stem", "cluster"]], on="stem")
    centroids = r.fit_centroids(frame)
    np.testing.assert_allclose(centroids.transform(frame[list(FEATURE_NAMES)].to_numpy()), weighted_matrix(frame),
                               atol=1e-6)
    assert centroids.names == sorted(set(base["cluster"]))

    truth = {}
    for i in range(10):
        item = pool_item(i)
        truth[f"b--p{i}"] = item.product_type
        add_item(bucket_url, None, f"b--p{i}", item, stamp(i))
    result = r.build_retraining_dataset(bucket_url, BASE, c.list_pool(bucket_url), r.RetrainingConfig(working_size=SIDE))
    assert result["centroids"] == "features" and result["n_new_ok"] == 10
    new = read_table(result["manifest_url"]).set_index("stem").loc[list(truth)]
    assert sum(new.at[s, "cluster"] == t for s, t in truth.items()) >= 7
    assert all(new.at[s, "cluster"] == "long_pants" for s, t in truth.items() if t == "long_pants")


def test_a_base_without_clusters_gives_all_and_relative_urls_are_resolved(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    base = write_base(bucket_url, None, cluster_for=lambda i, t: None)
    base_url = storage.join(bucket_url, "datasets", BASE)
    relative = base.copy()
    relative["image_url"] = [u[len(base_url) + 1:] for u in relative["image_url"]]
    relative["mask_url"] = [u[len(base_url) + 1:] for u in relative["mask_url"]]
    write_table(relative, storage.join(base_url, "manifest.parquet"))
    for i in range(4):
        add_item(bucket_url, None, f"b--p{i}", pool_item(i), stamp(i))
    result = r.build_retraining_dataset(bucket_url, BASE, c.list_pool(bucket_url), r.RetrainingConfig(val_fraction=0.0))
    assert result["new_clusters"] == {"all": 4} and result["centroids"] is None
    assert result["new_splits"] == {"train": 4, "val": 0, "test": 0}
    manifest = read_table(result["manifest_url"])
    old = manifest[manifest["batch"] != r.POOL_BATCH]
    assert old["image_url"].tolist() == base.loc[base["status"] == "ok", "image_url"].tolist()
    assert load_samples(result["dataset_url"], "test") == load_samples(base_url, "test")


def test_a_corrected_pool_pair_replaces_its_earlier_version_and_keeps_its_split(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    write_base(bucket_url, None)
    config = r.RetrainingConfig(working_size=SIDE, val_fraction=0.5)
    for i in range(6):
        add_item(bucket_url, None, f"b--p{i}", pool_item(i), stamp(i))
    state = r.read_state(bucket_url)
    first = r.build_retraining_dataset(bucket_url, BASE, r.new_pool_pairs(bucket_url, state), config)
    state = r.advance_state(state, first)
    r.write_state(bucket_url, state)

    # a person corrects the published pair b--p3 (the pool pair is rewritten, with a new 'at')
    item = pool_item(3)
    corrected = item.mask.copy()
    corrected[: corrected.shape[0] // 8] = 0
    add_item(bucket_url, None, "b--p3", item, stamp(30), origin="corrected", mask=corrected)
    add_item(bucket_url, None, "b--p9", pool_item(9), stamp(31))
    pairs = r.new_pool_pairs(bucket_url, r.read_state(bucket_url))
    assert [p["pair_id"] for p in pairs] == ["b--p3", "b--p9"]
    second = r.build_retraining_dataset(bucket_url, first["version"], pairs, config)
    assert second["n_superseded"] == 1 and second["n_new_ok"] == 2 and second["n_quarantined"] == 0
    assert second["n_base"] == N_BASE + 6 - 1

    before = read_table(first["manifest_url"]).set_index("stem")
    after = read_table(second["manifest_url"]).set_index("stem")
    assert after.index.is_unique and len(after) == N_BASE + 7
    assert after.at["b--p3", "split"] == before.at["b--p3", "split"]
    assert after.at["b--p3", "image_url"].startswith(second["dataset_url"])
    assert after.at["b--p3", "mask_sha256"] != before.at["b--p3", "mask_sha256"]
    assert (after[after["split"] == "test"].index == before[before["split"] == "test"].index).all()

    # a pool pair named like a studio stem of the base is refused, not merged
    add_item(bucket_url, None, "sku-0-00001", pool_item(11), stamp(40))
    clash = r.build_retraining_dataset(bucket_url, BASE, c.list_pool(bucket_url, since=stamp(39)), config)
    assert clash["reasons"] == {"duplicate_stem": 1}


def test_clear_errors(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    add_item(bucket_url, None, "b--p0", pool_item(0), stamp(0))
    pairs = c.list_pool(bucket_url)
    with pytest.raises(ValueError, match="no manifest"):
        r.build_retraining_dataset(bucket_url, "missing-version", pairs)
    write_base(bucket_url, None)
    with pytest.raises(ValueError, match="no pool pairs"):
        r.build_retraining_dataset(bucket_url, BASE, [])
    with pytest.raises(ValueError, match="base_version"):
        r.build_retraining_dataset(bucket_url, "../x", pairs)
    storage.write_text(r.state_url(bucket_url), "[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        r.read_state(bucket_url)


def test_a_pool_pair_that_could_not_be_read_is_not_recorded_as_quarantined(tmp_path):
    """A pair quarantined for its bytes is not carried into every later run; one the run could not read
    (a storage error that may pass) is: it is left out of the result's ``quarantined``."""
    bucket_url = str(tmp_path / "bucket")
    write_base(bucket_url, None)
    add_item(bucket_url, None, "b--p0", pool_item(0), stamp(0))
    (pair,) = r.new_pool_pairs(bucket_url, r.read_state(bucket_url))
    gone = {**pair, "pair_id": "b--gone", "at": stamp(1), "mask_url": str(tmp_path / "nowhere" / "mask.png")}
    result = r.build_retraining_dataset(bucket_url, BASE, [pair, gone], r.RetrainingConfig(working_size=SIDE))
    assert result["reasons"] == {"read_error": 1} and result["quarantined"] == {}
    assert result["consumed"] == {"b--p0": stamp(0), "b--gone": stamp(1)}
