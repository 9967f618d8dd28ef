"""The production loop end to end, on moto S3, the Airflow api-server and ``dag.test()``:

champion → ``bgremoval_inference`` publishes confident cut-outs and queues doubtful ones →
a reviewer accepts and corrects through the correction page's HTTP API → ``bgremoval_retraining``
builds a new dataset version from the pool and triggers ``bgremoval_training`` with
``init_from=champion`` → that training run (the same conf) passes the same gate and is promoted.
"""

from __future__ import annotations

import base64
import json
import os

import cv2
import numpy as np
import pytest

from tasks import registry
from tasks.core import storage
from tasks.serving.engines import load_engine
from tasks.serving.mlflow_model import pyfunc_model
from tasks.serving.pipeline import InferenceConfig, iter_remove_backgrounds
from tasks.core.manifest import read_table
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.dev.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.integration


def test_publish_correct_retrain_promote(s3_bucket, reviewer, client_for, tmp_path, write_model_folder, run_dag, capfd):
    bucket_url, options = s3_bucket
    bucket = bucket_url.removeprefix("s3://")
    name = f"loop-{bucket}"
    write_synthetic_dataset(f"{bucket_url}/datasets/base-1", 18, seed=31, max_side=96,
                            split_for=lambda i: ("test", "val", "train", "train", "train", "train")[i % 6],
                            storage_options=options)
    champion = write_model_folder(tmp_path / "champion", input_size=64, widths=None)  # full U2-NetP: training starts from it
    registered = registry.register_model(champion, name, experiment="bgremoval-tests", tags={"dataset_version": "base-1"},
                                         pyfunc_model=pyfunc_model())
    assert registry.promote(name, registered["version"])["champion"] == "1"

    photos = SynthConfig(n=8, seed=44, max_side=200)
    for i in range(8):
        storage.write_bytes(f"{bucket_url}/incoming/drop-1/shot{i}.jpg", encode_jpeg(render_item(i, photos).image), options)
    awkward = {"zero.jpg": b"", "caption.jpg": b"this is a caption, not a photo\n" * 10}  # a bad day's exports
    for file_name, data in awkward.items():
        storage.write_bytes(f"{bucket_url}/incoming/drop-1/{file_name}", data, options)
    storage.write_bytes(f"{bucket_url}/incoming/drop-1/_READY", b"", options)
    # a threshold between the champion's scores, so that both routes are taken
    engine = load_engine(registry.download_model(registry.model_uri(name), str(tmp_path / "dl")))
    urls = [(f"{bucket_url}/incoming/drop-1/shot{i}.jpg", f"shot{i}") for i in range(8)]
    scores = sorted(r.score for r in iter_remove_backgrounds(urls, engine, InferenceConfig(), options))
    threshold = (scores[3] + scores[4]) / 2

    inference = run_dag("bgremoval_inference", {"batch": "drop-1", "bucket": bucket, "registered_model": name,
                                                "quality_threshold": threshold, "photos_per_shard": 3})
    assert inference.state == "success"
    published = {o.relpath for o in storage.list_objects(f"{bucket_url}/published/drop-1", options)}
    assert len([p for p in published if p.endswith(".png") and "/" not in p]) == 4
    queue = reviewer.request("GET", f"/bgremoval/api/corrections?bucket={bucket}")["items"]
    assert len(queue) == 4 and all(q["model_version"] == "1" for q in queue)
    failed = {entry["stem"]: entry["reason"] for o in storage.list_objects(f"{bucket_url}/production/drop-1/failed", options)
              for entry in json.loads(storage.read_bytes(o.url, options))}
    assert set(failed) == {"zero", "caption"} and "empty" in failed["zero"] and "not an image" in failed["caption"]
    events = client_for("admin").request("GET", "/api/v2/assets/events?limit=50")["asset_events"]
    assert any(e["extra"].get("bucket") == bucket and e["extra"].get("new_pairs") == 4 for e in events)

    # a person accepts one doubtful mask and paints another
    first, second = queue[0]["item_id"], queue[1]["item_id"]
    reviewer.request("POST", f"/bgremoval/api/corrections/{first}/decision?bucket={bucket}", {"decision": "accepted"})
    mask = cv2.imdecode(np.frombuffer(reviewer.request(
        "GET", f"/bgremoval/api/corrections/{second}/mask?bucket={bucket}"), np.uint8), cv2.IMREAD_GRAYSCALE)
    painted = mask.copy()
    painted[mask.shape[0] // 4: 3 * mask.shape[0] // 4, mask.shape[1] // 4: 3 * mask.shape[1] // 4] = 255
    body = {"decision": "corrected", "mask_source": "brush",
            "mask_png_base64": base64.b64encode(cv2.imencode(".png", painted)[1].tobytes()).decode()}
    answer = reviewer.request("POST", f"/bgremoval/api/corrections/{second}/decision?bucket={bucket}", body)
    assert answer["decision"] == "corrected" and sorted(answer["published"]) == ["composite_jpeg", "cutout_png", "mask_png"]
    published_now = {o.relpath for o in storage.list_objects(f"{bucket_url}/published/drop-1", options)}
    assert len([p for p in published_now if p.endswith(".png") and "/" not in p]) == 6  # both decided photos too

    training_conf = {"train_input_size": 64, "batch_size": 4, "workers": 1, "max_steps_per_epoch": 2,
                     "target_per_cluster": 6, "iou_gate": 0.0, "cluster_iou_gate": 0.0, "tolerance": 1.0}
    retraining = run_dag("bgremoval_retraining", {"bucket": bucket, "registered_model": name, "min_new_pairs": 6,
                                                  "retrain_epochs": 1, "working_size": 96, "training_conf": training_conf})
    assert retraining.state == "success"
    state = json.loads(storage.read_bytes(f"{bucket_url}/retraining/state.json", options))
    version = state["last_dataset_version"]
    assert version.startswith("retrain-") and state["history"][-1]["n_new"] == 6
    base = read_table(f"{bucket_url}/datasets/base-1/manifest.parquet", options)
    new = read_table(f"{bucket_url}/datasets/{version}/manifest.parquet", options)
    assert sorted(new.loc[new["split"] == "test", "stem"]) == sorted(base.loc[base["split"] == "test", "stem"])
    added = new[new["batch"] == "retraining-pool"]
    assert len(added) == 6 and set(added["split"]) <= {"train", "val"}

    runs = client_for("admin").request("GET", "/api/v2/dags/bgremoval_training/dagRuns?limit=100")["dag_runs"]
    triggered = [r for r in runs if (r.get("conf") or {}).get("dataset_version") == version]
    assert len(triggered) == 1
    # its run id comes from the version and the retraining run's: a cleared trigger_training finds it
    assert triggered[0]["dag_run_id"] == state["history"][-1]["training_run"] == f"retrain__{version}__{retraining.run_id}"
    conf = triggered[0]["conf"]
    assert conf["init_from"] == "champion" and conf["epochs"] == 1 and conf["registered_model"] == name

    # the triggered run's conf, executed: reuses the dataset, starts from the champion, passes the gate
    capfd.readouterr()
    assert run_dag("bgremoval_training", conf).state == "success"
    assert "retraining on the existing dataset version" in capfd.readouterr().out
    assert registry.alias_version(name, "champion") == "2" and registry.alias_version(name, "previous") == "1"
    tags = registry.version_tags(name, "2")
    assert tags["dataset_version"] == version
    staged = [o for o in storage.list_objects(f"{bucket_url}/training/{version}", options) if o.relpath.endswith("init/model.pt")]
    assert len(staged) == 1  # the champion's weights were the starting point
    assert "quality.json" in os.listdir(registry.download_model(registry.model_uri(name), str(tmp_path / "dl2")))

    # A challenger that fails the gate fails the run, so a loop whose models stop passing is seen (the
    # failure notices fire); the champion stays.
    rejected = run_dag("bgremoval_training", {**conf, "iou_gate": 1.0})
    states = {ti.task_id: ti.state for ti in rejected.get_task_instances()}
    assert rejected.state == "failed", states
    assert states["check_gate"] == "failed" and states["promote_model"] == "upstream_failed", states
    assert registry.alias_version(name, "champion") == "2"
    # With gate_failure=skip (runs by hand that only explore) the same challenger skips promotion in a
    # successful run.
    explored = run_dag("bgremoval_training", {**conf, "iou_gate": 1.0, "gate_failure": "skip"})
    states = {ti.task_id: ti.state for ti in explored.get_task_instances()}
    assert explored.state == "success", states
    assert states["check_gate"] == "success" and states["promote_model"] == "skipped", states
    assert registry.alias_version(name, "champion") == "2"
