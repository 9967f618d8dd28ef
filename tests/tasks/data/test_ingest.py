"""The ingest stage end to end on storage: plan, mapped shards, finalize; local and on moto S3."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest

from tasks.data import ingest
from tasks.core import storage
from tasks.dev.badinputs import BAD_KINDS, write_bad_inputs
from tasks.data.cleaning import CleaningConfig
from tasks.core.manifest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS, read_table

CONFIG = CleaningConfig(working_size=128)


def _run(bucket_url: str, batch: str, options=None, shard_size: int = 7, predict=None) -> dict:
    plan = ingest.plan_batch(bucket_url, batch, CONFIG, shard_size=shard_size, storage_options=options)
    results = [ingest.clean_shard(u, plan["dataset_url"], batch, CONFIG, options, predict=predict)
               for u in plan["shard_urls"]]
    return ingest.finalize_dataset(
        plan["dataset_url"], batch, [r["result_url"] for r in results], plan["listing_rejects_url"], options
    )


def _snapshot(url: str, options=None) -> dict[str, bytes]:
    return {o.relpath: storage.read_bytes(o.url, options) for o in storage.list_objects(url, options)}


@pytest.fixture()
def corpus_batch(tmp_path):
    bucket = str(tmp_path / "bucket")
    rows = write_bad_inputs(storage.join(bucket, "raw", "b1"), len(BAD_KINDS), seed=1)
    storage.write_bytes(storage.join(bucket, "raw", "b1", "_READY"), b"")
    return bucket, rows


def test_every_bad_kind_ends_with_its_reason_and_good_ones_are_kept(corpus_batch):
    bucket, rows = corpus_batch
    summary = _run(bucket, "b1")
    manifest = read_table(summary["manifest_url"])
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    for row in rows:
        mine = manifest[manifest["stem"].str.contains(row["stem"], regex=False)]
        assert len(mine), f"{row['stem']} missing from the manifest"
        if row["expected_reason"]:
            assert row["expected_reason"] in set(mine["reason"]), (row, mine[["stem", "reason", "detail"]])
        else:
            assert set(mine["status"]) == {"ok"}, (row, mine[["stem", "reason", "detail"]])
    quarantine = read_table(summary["quarantine_url"])
    assert list(quarantine.columns) == list(QUARANTINE_COLUMNS)
    assert summary["quarantined"] == len(quarantine) == int((manifest["status"] == "quarantined").sum())
    assert summary["clean"] + summary["quarantined"] == summary["pairs_in"] == len(manifest)
    assert quarantine["reason"].notna().all() and (quarantine["detail"].str.len() > 0).all()


def test_clean_pairs_are_written_at_working_size(corpus_batch):
    bucket, _ = corpus_batch
    summary = _run(bucket, "b1")
    manifest = read_table(summary["manifest_url"])
    ok = manifest[manifest["status"] == "ok"]
    assert len(ok) >= 10
    import io

    from PIL import Image

    for row in ok.itertuples():
        image = Image.open(io.BytesIO(storage.read_bytes(row.image_url)))
        mask = Image.open(io.BytesIO(storage.read_bytes(row.mask_url)))
        assert image.size == mask.size == (row.width, row.height)
        assert max(image.size) == CONFIG.working_size
        assert mask.mode == "L" and image.mode == "RGB"
        assert "/clean/" in row.image_url and row.key in row.image_url


def test_duplicates_collapse_and_their_outputs_are_removed(corpus_batch):
    bucket, _ = corpus_batch
    summary = _run(bucket, "b1")
    manifest = read_table(summary["manifest_url"]).set_index("stem")
    kept = manifest.loc["bad-1-013-duplicate_content-a"]
    dropped = manifest.loc["bad-1-013-duplicate_content-b"]
    assert kept["status"] == "ok" and dropped["reason"] == "duplicate"
    assert "duplicate_content-a" in dropped["detail"]
    clean_files = [o.relpath for o in storage.list_objects(storage.join(summary["dataset_url"], "clean"))]
    assert not any("duplicate_content-b" in f for f in clean_files)
    assert len(clean_files) == 2 * summary["clean"]


def test_rerun_gives_same_version_and_no_duplicates_and_raw_is_untouched(corpus_batch):
    bucket, _ = corpus_batch
    raw_before = _snapshot(storage.join(bucket, "raw"))
    first = _run(bucket, "b1", shard_size=5)
    second = _run(bucket, "b1", shard_size=11)
    assert first["version"] == second["version"]
    assert _snapshot(storage.join(bucket, "raw")) == raw_before
    versions = {o.relpath.split("/")[0] for o in storage.list_objects(storage.join(bucket, "datasets"))}
    assert versions == {first["version"]}
    manifest = read_table(second["manifest_url"])
    for column in ("image_source", "mask_source"):  # every raw file is accounted for exactly once
        assert manifest[column].dropna().is_unique
    assert len(manifest) == first["pairs_in"]
    # a changed file is a new version
    storage.write_bytes(storage.join(bucket, "raw", "b1", "masks", "extra.png"), b"not really a png")
    changed = _run(bucket, "b1")["version"]
    assert changed != first["version"]
    # also when it keeps its size: a local file has no ETag, the time it was written tells
    extra = storage.join(bucket, "raw", "b1", "masks", "extra.png")
    storage.write_bytes(extra, b"not really a PNG")
    os.utime(extra, (time.time() + 10, time.time() + 10))
    assert _run(bucket, "b1")["version"] not in (changed, first["version"])


def test_cleaning_a_version_again_keeps_its_clusters_splits_and_review_answers(corpus_batch):
    from tasks.core.manifest import STATUS_OK, write_table

    bucket, _ = corpus_batch
    first = _run(bucket, "b1")
    manifest = read_table(first["manifest_url"])
    ok = manifest.index[manifest["status"] == STATUS_OK]
    manifest["cluster"] = manifest["cluster"].astype(object)
    manifest["split"] = manifest["split"].astype(object)
    manifest["audit_decision"] = manifest["audit_decision"].astype(object)
    manifest.loc[ok, "cluster"] = "tops"
    manifest.loc[ok, "split"] = ["test" if i % 2 else "train" for i in range(len(ok))]
    manifest.loc[ok[0], "audit_decision"] = "keep"
    manifest.loc[ok[1], "audit_decision"] = "fixed"
    manifest["mask_url"] = manifest["mask_url"].astype(object)
    manifest.loc[ok[1], "mask_url"] = "review/masks/fixed.png"  # where apply_review points a fixed pair
    write_table(manifest, first["manifest_url"])  # what the features, split and review stages write

    again = read_table(_run(bucket, "b1", shard_size=11)["manifest_url"]).set_index("key")
    before = manifest.set_index("key")
    columns = ["cluster", "split", "audit_decision", "mask_url"]
    assert (again.loc[before.index[ok], columns].fillna("") == before.loc[before.index[ok], columns].fillna("")).all().all()
    # a pair whose bytes changed since (its answers no longer apply): cleaned again without them, no crash
    manifest.loc[ok[2], "mask_sha256"] = "0" * 64
    write_table(manifest, first["manifest_url"])
    again = read_table(_run(bucket, "b1")["manifest_url"])
    again = again[again["status"] == STATUS_OK].set_index("key")
    changed = before.index[ok[2]]
    assert again.loc[changed, "status"] == STATUS_OK and pd.isna(again.loc[changed, "cluster"])
    assert again.loc[before.index[ok[1]], "mask_url"] == "review/masks/fixed.png"


def test_an_unreachable_store_fails_the_shard_instead_of_quarantining_pairs():
    from tasks.dev import stack

    unreachable = {"key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
                   "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{stack.free_port()}", "region_name": "us-east-1"}}
    row = {"stem": "a", "key": "a", "batch": "b1", "image_source": "s3://raw/b1/images/a.jpg",
           "mask_source": "s3://raw/b1/masks/a.png"}
    with pytest.raises(Exception, match="Could not connect to the endpoint URL"):
        ingest.read_and_clean(row, CONFIG, unreachable)


def test_a_file_that_vanishes_mid_run_is_quarantined_not_fatal(corpus_batch):
    bucket, _ = corpus_batch
    plan = ingest.plan_batch(bucket, "b1", CONFIG, shard_size=100)
    shard = read_table(plan["shard_urls"][0])
    victim = shard.iloc[0]
    import os

    os.remove(victim["image_source"])  # simulates a concurrent delete on the bucket, not our code
    result = ingest.clean_shard(plan["shard_urls"][0], plan["dataset_url"], "b1", CONFIG)
    assert result["reasons"].get("read_error") == 1
    assert result["n_pairs"] == len(shard)


def test_a_shard_leaves_opencv_threads_as_it_found_them(corpus_batch):
    import cv2

    bucket, _ = corpus_batch
    plan = ingest.plan_batch(bucket, "b1", CONFIG, shard_size=100)
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        ingest.clean_shard(plan["shard_urls"][0], plan["dataset_url"], "b1", CONFIG, io_threads=2)
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)


def test_empty_batch_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images/ or masks/"):
        ingest.plan_batch(str(tmp_path), "nothing", CONFIG)


def test_summary_json_and_table(corpus_batch):
    bucket, _ = corpus_batch
    summary = _run(bucket, "b1")
    on_disk = json.loads(storage.read_bytes(storage.join(summary["dataset_url"], "summary.json")))
    assert on_disk == summary
    text = ingest.format_summary(summary)
    assert "quarantined" in text and "mask_not_binary" in text


def test_ingest_on_s3(s3_bucket):
    bucket_url, options = s3_bucket
    write_bad_inputs(storage.join(bucket_url, "raw", "s3b"), len(BAD_KINDS), seed=2, storage_options=options)
    raw_before = _snapshot(storage.join(bucket_url, "raw"), options)
    summary = _run(bucket_url, "s3b", options)
    assert summary["dataset_url"].startswith(f"{bucket_url}/datasets/s3b-")
    assert summary["clean"] >= 10 and summary["quarantined"] >= 15
    manifest = read_table(summary["manifest_url"], options)
    assert all(u.startswith("s3://") for u in manifest["image_url"].dropna())
    assert _snapshot(storage.join(bucket_url, "raw"), options) == raw_before


def test_the_mask_audit_flags_a_broken_mask_and_counts_it(tmp_path):
    import cv2
    import numpy as np

    from tasks.dev.synth import SynthConfig, encode_jpeg, encode_png, render_item

    batch_url = storage.join(str(tmp_path / "bucket"), "raw", "audit")
    items = [render_item(i, SynthConfig(n=3, seed=2, max_side=200)) for i in range(3)]
    for index, item in enumerate(items):
        mask = item.mask.copy()
        if index == 0:  # a speckled, ragged mask: salt and pepper over the whole frame
            noise = np.random.default_rng(0).random(mask.shape)
            mask[noise < 0.04], mask[noise > 0.96] = 0, 255
        storage.write_bytes(storage.join(batch_url, "images", f"{item.stem}.jpg"), encode_jpeg(item.image))
        storage.write_bytes(storage.join(batch_url, "masks", f"{item.stem}.png"), encode_png(mask))
    storage.write_bytes(storage.join(batch_url, "_READY"), b"")
    summary = _run(str(tmp_path / "bucket"), "audit")
    manifest = read_table(summary["manifest_url"]).set_index("stem")
    assert summary["clean"] == 3 and summary["audit_flagged"] == 1
    assert "speckle" in manifest.loc[items[0].stem, "audit_reasons"]
    assert manifest.loc[items[1].stem, "audit_reasons"] == "" and manifest.loc[items[2].stem, "audit_reasons"] == ""
    assert "masks flagged by the audit    1" in ingest.format_summary(summary)
    assert cv2.imread(str(tmp_path / "bucket" / "raw" / "audit" / "masks" / f"{items[0].stem}.png"), 0) is not None


def test_the_model_check_flags_a_mask_a_confident_model_disagrees_with(tmp_path):
    """A neat mask of the wrong region: a confident model that sees the product elsewhere flags it
    (``model_disagrees``); a model that fails leaves the structural audit as it is."""
    import numpy as np

    from tasks.dev.synth import SynthConfig, encode_jpeg, encode_png, render_item

    batch_url = storage.join(str(tmp_path / "bucket"), "raw", "model")
    items = [render_item(i, SynthConfig(n=2, seed=4, max_side=200)) for i in range(2)]
    wrong = np.zeros_like(items[0].mask)
    h, w = wrong.shape
    wrong[h // 8: h // 3, w // 8: w // 3] = 255  # a neat rectangle, in the wrong place
    for item, mask in ((items[0], wrong), (items[1], items[1].mask)):
        storage.write_bytes(storage.join(batch_url, "images", f"{item.stem}.jpg"), encode_jpeg(item.image))
        storage.write_bytes(storage.join(batch_url, "masks", f"{item.stem}.png"), encode_png(mask))
    storage.write_bytes(storage.join(batch_url, "_READY"), b"")

    def oracle(image):  # a confident model that knows the true product of the (resized) photo
        import cv2

        size = (image.shape[1], image.shape[0])
        item = min(items, key=lambda i: np.abs(cv2.resize(i.image, size).astype(float) - image).mean())
        return (cv2.resize(item.mask, size, interpolation=cv2.INTER_NEAREST) > 127).astype(np.float32)

    manifest = read_table(_run(str(tmp_path / "bucket"), "model", predict=oracle)["manifest_url"]).set_index("stem")
    assert "model_disagrees" in manifest.loc[items[0].stem, "audit_reasons"].split(",")
    assert manifest.loc[items[1].stem, "audit_reasons"] == ""

    def broken(image):
        raise RuntimeError("the model is out of order")

    manifest = read_table(_run(str(tmp_path / "bucket"), "model", predict=broken)["manifest_url"]).set_index("stem")
    assert (manifest["status"] == "ok").all() and "model_disagrees" not in manifest.loc[items[0].stem, "audit_reasons"]


def test_an_existing_dataset_version_is_reused_only_when_it_has_a_manifest(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    with pytest.raises(ValueError, match="has no manifest"):
        ingest.existing_dataset(bucket_url, "v1")
    storage.write_bytes(f"{bucket_url}/datasets/v1/manifest.parquet", b"PAR1")
    assert ingest.existing_dataset(bucket_url, " v1 ") == {"version": "v1", "dataset_url": f"{bucket_url}/datasets/v1"}
