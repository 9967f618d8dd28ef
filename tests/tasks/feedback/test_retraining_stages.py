"""The retraining DAG's rules as stage functions: which base, when to retrain, what to trigger, what to record."""

from __future__ import annotations

import pytest

from tasks.dev.synth import SynthConfig, encode_jpeg, encode_png, render_item
from tasks.feedback import queue
from tasks.feedback import retraining_stages as stages
from tasks.feedback.retraining import empty_state, read_state


def _add(bucket_url: str, pair_id: str, at: str, origin: str = "published", model_version: str = "") -> None:
    item = render_item(0, SynthConfig(n=1, seed=3, max_side=96))
    meta = queue.PoolMeta(origin=origin, source_url=f"{bucket_url}/incoming/b/{pair_id}.jpg", at=at,
                          model_version=model_version)
    queue.add_to_pool(bucket_url, pair_id, encode_jpeg(item.image), encode_png(item.mask), meta)


def test_the_base_dataset_is_the_requested_one_else_the_last_one_built():
    state = {**empty_state(), "last_dataset_version": "retrain-v3"}
    assert stages.base_dataset(" v1 ", "no-such-model", state) == "v1"
    assert stages.base_dataset("", "no-such-model", state) == "retrain-v3"
    assert stages.base_dataset("", "no-such-model", empty_state()) == ""


def test_new_pairs_are_counted_by_origin_and_a_run_needs_a_base_and_enough_of_them(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    _add(bucket_url, "p1", "2026-03-01T10:00:01.000000+00:00")
    _add(bucket_url, "p2", "2026-03-01T10:00:02.000000+00:00", origin="corrected")
    found = stages.find_new_pairs(bucket_url, "base-v1", "no-such-model")
    assert found == {"n_new": 2, "until": "2026-03-01T10:00:02.000000+00:00", "base_version": "base-v1",
                     "rolled_back": [], "origins": {"published": 1, "accepted": 0, "corrected": 1}, "n_carried": 0,
                     "n_left_out": 0}
    assert stages.worth_retraining(found, min_new_pairs=2)
    assert not stages.worth_retraining(found, min_new_pairs=3)
    assert not stages.worth_retraining({**found, "base_version": ""}, min_new_pairs=1)


def test_the_training_request_starts_from_the_champion_on_the_new_version():
    request = stages.training_request({"workers": 4, "epochs": 9}, "shop", "retrain-v4", 3, "m", 320,
                                      "scheduled__2026-03-02T04:00:00+00:00")
    assert request["conf"] == {"workers": 4, "epochs": 3, "bucket": "shop", "dataset_version": "retrain-v4",
                               "init_from": "champion", "registered_model": "m", "working_size": 320}
    # one training run per retraining run and version: a cleared trigger_training finds it instead of
    # starting another; a run cleared from find_new_pairs after new pairs came in trains the new version
    assert request["run_id"] == "retrain__retrain-v4__scheduled__2026-03-02T04:00:00+00:00"
    again = stages.training_request({}, "shop", "retrain-v5", 3, "m", 320, "scheduled__2026-03-02T04:00:00+00:00")
    assert again["run_id"] == "retrain__retrain-v5__scheduled__2026-03-02T04:00:00+00:00"


def test_the_training_request_trains_the_champions_recipe_unless_told_otherwise():
    champion = {"version": "7", "model": "u2net", "input_size": 288, "loss": "wbce+wiou", "model_widths": None}
    request = stages.training_request({"loss": "bce", "workers": 4}, "shop", "retrain-v4", 3, "m", 320, "run",
                                      champion)
    assert request["conf"] == {"model": "u2net", "train_input_size": 288, "loss": "bce", "workers": 4, "epochs": 3,
                               "bucket": "shop", "dataset_version": "retrain-v4", "init_from": "champion",
                               "registered_model": "m", "working_size": 320}
    older = {"version": "2", "model": "u2netp", "input_size": 320, "model_widths": None}  # registered before loss tags
    assert "loss" not in stages.training_request({}, "shop", "v5", 3, "m", 320, "run", older)["conf"]
    with pytest.raises(ValueError, match="asks for a u2netp, but retraining starts from .* a u2net "):
        stages.training_request({"model": "u2netp"}, "shop", "v5", 3, "m", 320, "run", champion)
    assert stages.training_request({"model": "u2net"}, "shop", "v5", 3, "m", 320, "run", champion)["conf"]["model"] == "u2net"
    custom = {**champion, "model_widths": {"encoder": [[3, 8, 8]]}}
    with pytest.raises(ValueError, match="custom channel widths"):  # the training form cannot set them
        stages.training_request({}, "shop", "v5", 3, "m", 320, "run", custom)


def test_recording_a_run_moves_the_pool_cursor(tmp_path):
    bucket_url = str(tmp_path / "bucket")
    dataset = {"version": "retrain-v2", "base_version": "base-v1", "n_new": 2, "n_new_ok": 2, "n_quarantined": 0,
               "last_pair_at": "2026-03-01T10:00:02.000000+00:00"}
    recorded = stages.record_state(bucket_url, dataset, "retraining-run", "training-run")
    assert recorded == {"last_pair_at": dataset["last_pair_at"], "last_dataset_version": "retrain-v2",
                        "training_run": "training-run"}
    state = read_state(bucket_url)
    assert state["history"][-1]["training_run"] == "training-run"
    assert state["history"][-1]["retraining_run"] == "retraining-run"


def test_pairs_of_a_run_whose_model_never_became_champion_come_again(tmp_path):
    """A retraining run marks its pairs used, but when its model fails the gate (or its training never
    runs) the champion's dataset lacks them: the next run on that base takes them again, and only the
    new pairs count towards min_new_pairs."""
    import pandas as pd

    from tasks.core import layout
    from tasks.core.manifest import write_table
    from tasks.feedback.retraining import POOL_BATCH

    from tasks.data.cleaning import sha256

    bucket_url = str(tmp_path / "bucket")
    for i, pair_id in enumerate(("p1", "p2", "p3")):
        _add(bucket_url, pair_id, f"2026-03-01T10:00:0{i + 1}.000000+00:00")
    p1_mask = next(p["mask_url"] for p in queue.list_pool(bucket_url) if p["pair_id"] == "p1")
    base = pd.DataFrame({"stem": ["sku-1", "p1"], "batch": ["shoot", POOL_BATCH], "status": ["ok", "ok"],
                         "mask_sha256": ["x", sha256(open(p1_mask, "rb").read())]})
    write_table(base, layout.manifest(layout.dataset(bucket_url, "base-v1")))  # holds p1 from an older promoted run
    used = {"version": "retrain-v2", "base_version": "base-v1", "n_new": 3, "n_new_ok": 3, "n_quarantined": 0,
            "last_pair_at": "2026-03-01T10:00:03.000000+00:00",
            "consumed": {p["pair_id"]: p["at"] for p in queue.list_pool(bucket_url)}}
    stages.record_state(bucket_url, used, "retraining-run", "training-run")  # retrain-v2 was never promoted
    _add(bucket_url, "p4", "2026-03-01T10:00:04.000000+00:00")

    found = stages.find_new_pairs(bucket_url, "base-v1", "no-such-model")
    assert found["n_new"] == 1 and found["n_carried"] == 2  # p4 new; p2, p3 again; p1 is in the base already
    assert not stages.worth_retraining(found, min_new_pairs=2)
    from tasks.feedback.retraining import pool_pairs_missing_from

    assert [p["pair_id"] for p in pool_pairs_missing_from(bucket_url, "base-v1", read_state(bucket_url))] == ["p2", "p3"]
    assert pool_pairs_missing_from(bucket_url, "no-such-version", read_state(bucket_url)) == []

    # The next run quarantined p3 (its mask, say, is broken) and failed too: p3 is not carried into
    # every run after it, to be quarantined again; a person's new version of p3 would be new.
    p3_at = next(p["at"] for p in queue.list_pool(bucket_url) if p["pair_id"] == "p3")
    stages.record_state(bucket_url, {**used, "version": "retrain-v3", "consumed": {"p3": p3_at},
                                     "quarantined": {"p3": p3_at}}, "retraining-run-2", "training-run-2")
    assert [p["pair_id"] for p in pool_pairs_missing_from(bucket_url, "base-v1", read_state(bucket_url))] == ["p2"]


def test_a_correction_that_a_failed_run_used_comes_again_though_the_base_holds_the_pair(tmp_path):
    """p1 is in the champion's dataset as published; a person corrects it (same id, new mask); a run
    uses the correction but its model is never promoted: the next run takes the correction again."""
    import pandas as pd

    from tasks.core import layout
    from tasks.core.manifest import write_table
    from tasks.data.cleaning import sha256
    from tasks.dev.synth import encode_png
    from tasks.feedback.retraining import POOL_BATCH, pool_pairs_missing_from

    bucket_url = str(tmp_path / "bucket")
    _add(bucket_url, "p1", "2026-03-01T10:00:01.000000+00:00")
    (published,) = queue.list_pool(bucket_url)
    base = pd.DataFrame({"stem": ["p1"], "batch": [POOL_BATCH], "status": ["ok"],
                         "mask_sha256": [sha256(open(published["mask_url"], "rb").read())]})
    write_table(base, layout.manifest(layout.dataset(bucket_url, "base-v1")))
    item = render_item(1, SynthConfig(n=2, seed=3, max_side=96))
    meta = queue.PoolMeta(origin="corrected", source_url=f"{bucket_url}/incoming/b/p1.jpg",
                          at="2026-03-02T10:00:00.000000+00:00", user="ana")
    queue.add_to_pool(bucket_url, "p1", encode_jpeg(item.image), encode_png(item.mask), meta, replace=True)
    (corrected,) = queue.list_pool(bucket_url)
    used = {"version": "retrain-v2", "base_version": "base-v1", "n_new": 1, "n_new_ok": 1, "n_quarantined": 0,
            "last_pair_at": corrected["at"], "consumed": {"p1": corrected["at"]}}
    stages.record_state(bucket_url, used, "retraining-run", "training-run")  # its model failed the gate
    assert [p["pair_id"] for p in pool_pairs_missing_from(bucket_url, "base-v1", read_state(bucket_url))] == ["p1"]


def test_pairs_a_rolled_back_version_published_unreviewed_are_left_out(tmp_path):
    """Version 2 was rolled back: the cut-outs it published without a person's look do not train the
    next model (its masks are what was rolled back); a person's decision on one of its photos does."""
    from mlflow import MlflowClient

    from tasks import registry

    client = MlflowClient()
    client.create_registered_model("rolled-m")
    for _ in range(2):
        client.create_model_version("rolled-m", str(tmp_path))
    for tag, value in zip(registry.ROLLBACK_TAGS, ("2026-03-01T12:00:00+00:00", "ops")):
        client.set_model_version_tag("rolled-m", "2", tag, value)
    assert registry.rolled_back_versions("rolled-m") == ["2"] and registry.rolled_back_versions("no-such-model") == []

    bucket_url = str(tmp_path / "bucket")
    _add(bucket_url, "by-v1", "2026-03-01T10:00:01.000000+00:00", model_version="1")
    _add(bucket_url, "by-v2", "2026-03-01T10:00:02.000000+00:00", model_version="2")
    _add(bucket_url, "fixed", "2026-03-01T10:00:03.000000+00:00", origin="corrected", model_version="2")
    found = stages.find_new_pairs(bucket_url, "base-v1", "rolled-m")
    assert (found["n_new"], found["n_left_out"], found["rolled_back"]) == (2, 1, ["2"])
    assert found["origins"] == {"published": 1, "accepted": 0, "corrected": 1}
