"""The production stage on the real moto S3: plan a drop, cut out a shard, route by quality score,
calibrate a threshold."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.core import storage
from tasks.evaluation.calibration import calibrate_model, score_quality
from tasks.feedback.queue import list_pool, list_queue
from tasks.model.refine import RefineConfig
from tasks.model.refine_choice import choose_refinement, load_refine_choice
from tasks.feedback.production import (
    NoChampion,
    ProductionConfig,
    plan_production,
    process_shard,
    resolve_model,
    resolve_threshold,
    summarise_production,
)
from tasks.dev.awkward import CONVERTIBLE, REFUSED, awkward_drop
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.dev.synthetic import write_synthetic_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[3]



@pytest.fixture()
def drop(s3_bucket):
    """Six product photos and one corrupt file in ``incoming/drop-1/``."""
    bucket_url, options = s3_bucket
    config = SynthConfig(n=6, seed=5, max_side=160)
    for i in range(6):
        item = render_item(i, config)
        storage.write_bytes(f"{bucket_url}/incoming/drop-1/p{i}.jpg", encode_jpeg(item.image), options)
    storage.write_bytes(f"{bucket_url}/incoming/drop-1/broken.jpg", b"not a jpeg", options)
    storage.write_bytes(f"{bucket_url}/incoming/drop-1/_READY", b"", options)
    return bucket_url, options


def test_plan_shards_the_drop(drop):
    bucket_url, options = drop
    plan = plan_production(bucket_url, "drop-1", shard_size=3, storage_options=options)
    assert plan["n_images"] == 7 and len(plan["shard_urls"]) == 3
    listed = [stem for url in plan["shard_urls"] for _, stem in json.loads(storage.read_bytes(url, options))]
    assert sorted(listed) == ["broken", "p0", "p1", "p2", "p3", "p4", "p5"]
    with pytest.raises(ValueError, match="no images"):
        plan_production(bucket_url, "nothing-here", storage_options=options)
    capped = plan_production(bucket_url, "drop-1", shard_size=1, storage_options=options, max_shards=2)
    assert len(capped["shard_urls"]) == 2  # seven photos, at most two mapped tasks: shards of four


def test_shard_routes_by_score_and_reports_failures(drop, tmp_path, write_model_folder, caplog):
    bucket_url, options = drop
    model = write_model_folder(tmp_path / "model")
    plan = plan_production(bucket_url, "drop-1", shard_size=10, storage_options=options)
    with caplog.at_level("INFO", logger="tasks.feedback.production"):
        probe = process_shard(bucket_url, "probe", plan["shard_urls"][0], model, ProductionConfig(threshold=0.0), "v1",
                              options)
    assert "7 photos, model torch on cpu" in caplog.text  # the task log says which model ran, on what
    scores = sorted(probe["scores"])
    assert len(scores) == 6 and probe["failed"] == 1 and probe["published"] == 6
    threshold = (scores[2] + scores[3]) / 2
    before = {o.relpath: o.etag for o in storage.list_objects(f"{bucket_url}/incoming", options)}

    result = process_shard(bucket_url, "drop-1", plan["shard_urls"][0], model, ProductionConfig(threshold=threshold),
                           "v7", options)
    assert (result["published"], result["queued"], result["failed"]) == (3, 3, 1)
    failed = json.loads(storage.read_bytes(result["failed_url"], options))
    assert failed[0]["stem"] == "broken" and failed[0]["reason"]

    queue = [q for q in list_queue(bucket_url, options) if q["batch"] == "drop-1"]
    assert len(queue) == 3 and all(q["score"] < threshold and q["model_version"] == "v7" for q in queue)
    pool = [p for p in list_pool(bucket_url, options) if p["pair_id"].startswith("drop-1--")]
    assert len(pool) == 3 and {p["origin"] for p in pool} == {"published"}
    published = {o.relpath for o in storage.list_objects(f"{bucket_url}/published/drop-1", options)}
    for entry in pool:
        stem = entry["source_url"].rsplit("/", 1)[-1].removesuffix(".jpg")
        assert {f"{stem}.png", f"{stem}.jpg", f"masks/{stem}.png"} <= published
        cutout = cv2.imdecode(np.frombuffer(storage.read_bytes(f"{bucket_url}/published/drop-1/{stem}.png", options), np.uint8),
                              cv2.IMREAD_UNCHANGED)
        assert cutout.shape[2] == 4
    # inputs untouched; a retried shard (the same run), or the same photos dropped again (a _READY
    # written again: another run) and cut out by a champion that would publish them all, leaves every
    # photo as the first try routed it: nothing more in the queue or the pool, no queued photo
    # published, no published file rewritten. The retry counts them as its run's, the other run as
    # handled before.
    assert {o.relpath: o.etag for o in storage.list_objects(f"{bucket_url}/incoming", options)} == before
    outputs = {o.relpath: o.etag for o in storage.list_objects(f"{bucket_url}/published/drop-1", options)}
    retried = process_shard(bucket_url, "drop-1", plan["shard_urls"][0], model, ProductionConfig(threshold=0.0), "v9",
                            options)
    assert (retried["published"], retried["queued"], retried["failed"], retried["earlier"]) == (3, 3, 1, 0)
    redropped = process_shard(bucket_url, "drop-1", plan["shard_urls"][0], model, ProductionConfig(threshold=0.0), "v9",
                              options, run_id="drop__drop-1__5e1f0c2a")
    assert (redropped["published"], redropped["queued"], redropped["failed"], redropped["earlier"]) == (0, 0, 1, 6)
    assert len([q for q in list_queue(bucket_url, options) if q["batch"] == "drop-1"]) == 3
    assert {o.relpath: o.etag for o in storage.list_objects(f"{bucket_url}/published/drop-1", options)} == outputs
    total = summarise_production("drop-1", [result])
    assert total["published"] == 3 and total["queued"] == 3 and total["earlier"] == 0 and total["published_share"] == 0.5
    assert summarise_production("drop-1", [redropped])["earlier"] == 6

    # The studio drops p0-p5 again under the same batch, with new photos: none is skipped, each gets
    # its own item or pair next to the earlier photo's, which is kept.
    first_queue = {q["item_id"]: q["source_sha256"] for q in list_queue(bucket_url, options) if q["batch"] == "drop-1"}
    first_pool = {p["pair_id"]: p["source_sha256"] for p in list_pool(bucket_url, options) if p["pair_id"].startswith("drop-1--")}
    for i in range(6):
        storage.write_bytes(f"{bucket_url}/incoming/drop-1/p{i}.jpg",
                            encode_jpeg(render_item(i, SynthConfig(n=6, seed=99, max_side=160)).image), options)
    again = process_shard(bucket_url, "drop-1", plan["shard_urls"][0], model, ProductionConfig(threshold=threshold),
                          "v8", options)
    assert again["published"] + again["queued"] == 6
    queue = {q["item_id"]: q["source_sha256"] for q in list_queue(bucket_url, options) if q["batch"] == "drop-1"}
    pool = {p["pair_id"]: p["source_sha256"] for p in list_pool(bucket_url, options) if p["pair_id"].startswith("drop-1--")}
    assert first_queue.items() <= queue.items() and first_pool.items() <= pool.items()  # nothing lost
    assert len(queue) + len(pool) == 12 and len(set(queue.values()) | set(pool.values())) == 12
    assert all(len(v) == 64 for v in (*queue.values(), *pool.values()))
    process_shard(bucket_url, "drop-1", plan["shard_urls"][0], model, ProductionConfig(threshold=threshold), "v8", options)
    assert len([q for q in list_queue(bucket_url, options) if q["batch"] == "drop-1"]) == len(queue)  # retry: no more


def test_threshold_comes_from_the_calibration_unless_given(tmp_path, write_model_folder):
    dataset = str(tmp_path / "datasets" / "v1")
    write_synthetic_dataset(dataset, 9, seed=8, max_side=48,
                            split_for=lambda i: "val" if i < 4 else "test" if i < 7 else "train")
    model = write_model_folder(tmp_path / "model")
    with pytest.raises(ValueError, match="no calibrated quality threshold"):
        resolve_threshold(ProductionConfig(), model)
    points = score_quality(model, dataset, "val")
    assert len(points) == 4 and all(0 <= p.score <= 1 and 0 <= p.iou <= 1 for p in points)
    calibration = calibrate_model(model, dataset, target_iou=0.97, target_recall=0.9)
    assert calibration["calibrated_on"] == "val" and calibration["test"]["n"] == 3
    assert calibration["val"]["recall"] >= 0.9 and "routing on the test split" in calibration["text"]
    by_cluster = calibration["test_by_cluster"]  # the same threshold, measured on each cluster's test pairs
    test_points = score_quality(model, dataset, "test")
    assert {c: r["n"] for c, r in by_cluster.items()} == {c: sum(p.cluster == c for p in test_points)
                                                          for c in {p.cluster for p in test_points}}
    assert sum(r["true_positive"] for r in by_cluster.values()) == calibration["test"]["true_positive"]
    assert "per cluster:" in calibration["text"] and "short_sleeved" in calibration["text"]
    assert "caution: 4 images are too few" in calibration["text"] and "no val split" not in calibration["text"]
    assert resolve_threshold(ProductionConfig(), model) == (pytest.approx(calibration["threshold"]),
                                                            f"calibration in {model}/quality.json")
    assert resolve_threshold(ProductionConfig(threshold=0.3), model)[0] == 0.3
    # a registered model's folder is a temporary download: the message names the model instead
    assert resolve_threshold(ProductionConfig(), model, "models:/m/3")[1] == "calibration in quality.json of models:/m/3"


def test_calibration_measures_the_edge_refinement_and_production_follows_it(tmp_path, write_model_folder, s3_bucket):
    """The val pairs scored plain and refined (the network run once) decide ``refinement.json``; the
    threshold is calibrated on the IoU of what will be published; a production pass says what it follows."""
    dataset = str(tmp_path / "datasets" / "v1")
    write_synthetic_dataset(dataset, 9, seed=8, max_side=48,
                            split_for=lambda i: "val" if i < 4 else "test" if i < 7 else "train")
    model = write_model_folder(tmp_path / "model")
    calibration = calibrate_model(model, dataset, target_iou=0.97, target_recall=0.9)
    choice = load_refine_choice(model)
    points = score_quality(model, dataset, "val", refine=RefineConfig())
    assert [p.iou for p in points] == [p.iou for p in score_quality(model, dataset, "val")]
    assert (choice.n, choice.split) == (4, "val") and calibration["refinement"] == asdict(choice)
    assert choice.plain_mean_iou == pytest.approx(np.mean([p.iou for p in points]))
    assert choice.refined_mean_iou == pytest.approx(np.mean([p.refined_iou for p in points]))
    assert choice == choose_refinement([p.iou for p in points], [p.refined_iou for p in points], "val")
    assert calibration["val"]["n_bad"] == sum(p.published_iou(choice.refine) < 0.97 for p in points)
    assert calibration["refinement_test"]["n"] == 3 and f"edge refinement: {choice.describe()}" in calibration["text"]
    by_cluster = calibration["refinement_by_cluster"]  # what each product type's val pairs alone would choose
    assert by_cluster == {c: asdict(choose_refinement([p.iou for p in points if p.cluster == c],
                                                      [p.refined_iou for p in points if p.cluster == c], "val"))
                          for c in {p.cluster for p in points}}
    if len(by_cluster) > 1:
        assert "per cluster on val (what each would choose alone" in calibration["text"]
        assert all(f"{c:<12} {r['n']:>5d} pairs: gain" in calibration["text"] for c, r in by_cluster.items())

    bucket_url, options = s3_bucket
    storage.write_bytes(f"{bucket_url}/incoming/drop-r/p0.jpg",
                        encode_jpeg(render_item(0, SynthConfig(n=1, seed=3, max_side=96)).image), options)
    plan = plan_production(bucket_url, "drop-r", shard_size=10, storage_options=options)
    followed = process_shard(bucket_url, "drop-r", plan["shard_urls"][0], model, ProductionConfig(), "v1", options)
    forced = process_shard(bucket_url, "drop-r", plan["shard_urls"][0], model, ProductionConfig(refine="on"), "v1",
                           options)
    assert followed["refine"] == choice.describe() and forced["refine"] == "on (asked for)"
    with pytest.raises(ValueError, match="refine must be one of"):
        ProductionConfig(refine="maybe")


def test_the_run_uses_the_given_model_or_the_champion_and_says_when_there_is_none():
    # a version of the registered model is recorded by its number (what a rollback is matched with)
    assert resolve_model(" models:/m/3 ", "m") == {"model_uri": "models:/m/3", "version": "3"}
    assert resolve_model("models:/other/3", "m") == {"model_uri": "models:/other/3", "version": "models:/other/3"}
    assert resolve_model("s3://b/run/model.onnx", "m") == {"model_uri": "s3://b/run/model.onnx",
                                                           "version": "s3://b/run/model.onnx"}
    with pytest.raises(NoChampion, match="has no champion yet"):  # the DAG fails it without retries
        resolve_model("", "no-such-registered-model")


def test_a_drop_of_awkward_photos_completes_and_every_refusal_has_a_reason(tmp_path, write_model_folder):
    bucket_url = str(tmp_path / "bucket")
    for name, data in awkward_drop().items():
        storage.write_bytes(f"{bucket_url}/incoming/awkward/{name}", data)
    model = write_model_folder(tmp_path / "model")
    plan = plan_production(bucket_url, "awkward", shard_size=100)
    # The shard runs in a fresh process, as a task does, so that its own peak memory can be read. The
    # peak is VmHWM, which starts again at exec; ru_maxrss would keep the forked copy of this (large)
    # pytest process.
    script = ("import json, re, sys\n"
              "from pathlib import Path\n"
              "from tasks.feedback.production import ProductionConfig, process_shard\n"
              f"result = process_shard({bucket_url!r}, 'awkward', {plan['shard_urls'][0]!r}, {model!r}, "
              "ProductionConfig(threshold=0.0), 'v1')\n"
              "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1))\n"
              "print(json.dumps({**result, 'peak_rss_kib': peak}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak_mib = result["peak_rss_kib"] / 1024
    print(f"awkward drop: peak RSS of the shard's process {peak_mib:.0f} MiB (torch engine and model included)")
    assert peak_mib < 1536  # both bombs are refused from their headers, never decoded (~430/770 MiB as RGB)

    failed = {entry["stem"]: entry["reason"] for entry in json.loads(storage.read_bytes(result["failed_url"]))}
    assert result["images"] == plan["n_images"] == 14
    assert result["published"] + result["queued"] + result["failed"] == 14
    assert set(REFUSED) <= set(failed)
    assert "too large" in failed["bomb"] and "144.0 megapixels" in failed["bomb"]
    assert "too large" in failed["bomb256"] and "268435456 pixels" in failed["bomb256"], failed["bomb256"]
    assert "empty" in failed["zero"] and "not an image" in failed["text"]
    assert failed["thumbnail"] == "too small: 20x24, a side under min_side=32"
    assert all(reason for reason in failed.values())
    published = {o.relpath for o in storage.list_objects(f"{bucket_url}/published/awkward")}
    for stem in CONVERTIBLE:
        assert stem not in failed and f"{stem}.png" in published, (stem, failed.get(stem))
    assert storage.read_bytes(f"{bucket_url}/incoming/awkward/bomb.png")  # inputs are never touched


def test_a_model_whose_refinement_pays_is_calibrated_and_published_refined(tmp_path, write_model_folder, monkeypatch):
    """A split of a few synthetic pairs cannot show a gain, so the choice is made to come out on here:
    the threshold and the test routing must then be computed on the refined maps' IoUs, and
    production must refine."""
    import dataclasses

    from tasks.evaluation import calibration as calibration_module

    measured = calibration_module.choose_refinement
    monkeypatch.setattr(calibration_module, "choose_refinement",
                        lambda *args: dataclasses.replace(measured(*args), refine=True))
    dataset = str(tmp_path / "datasets" / "v1")
    write_synthetic_dataset(dataset, 9, seed=8, max_side=48,
                            split_for=lambda i: "val" if i < 4 else "test" if i < 7 else "train")
    model = write_model_folder(tmp_path / "model")
    val = score_quality(model, dataset, "val", refine=RefineConfig())
    test = score_quality(model, dataset, "test", refine=RefineConfig())
    # a target IoU at which the plain and the refined maps count a different number of bad images
    points = val + test
    target = next(t for t in sorted({p.iou for p in points} | {p.refined_iou for p in points})
                  if sum(p.iou < t for p in points) != sum(p.refined_iou < t for p in points))
    calibration = calibrate_model(model, dataset, target_iou=target, target_recall=0.9)
    assert load_refine_choice(model).refine and calibration["refinement"]["refine"]
    assert (calibration["val"]["n_bad"], calibration["test"]["n_bad"]) == (
        sum(p.refined_iou < target for p in val), sum(p.refined_iou < target for p in test))

    bucket_url = str(tmp_path / "bucket")
    storage.write_bytes(f"{bucket_url}/incoming/drop-on/p0.jpg",
                        encode_jpeg(render_item(0, SynthConfig(n=1, seed=3, max_side=96)).image))
    plan = plan_production(bucket_url, "drop-on", shard_size=10)
    followed = process_shard(bucket_url, "drop-on", plan["shard_urls"][0], model, ProductionConfig(), "v1")
    assert followed["refine"].startswith("on (measured for this model on 4 val pairs")
    assert followed["threshold_source"] == f"calibration in quality.json of {model}"
