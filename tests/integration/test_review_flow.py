"""The training DAG end to end: the DAG waits, a reviewer corrects clusters on the review page's HTTP
API and approves in Airflow's REST API (the paths a person's clicks take), the model trains, is
evaluated against the champion, passes the gate and is promoted; ``bgremoval model rollback``
gives the champion alias back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import mlflow
import pytest

from tasks import registry
from tasks.core import storage
from tasks.dev.airflow_client import AirflowHTTPError
from tasks.core.manifest import audit_excluded, read_table
from tasks.dev.synth import SynthConfig, generate_catalogue
from tasks.data.review import read_corrections
from tasks.serving.mlflow_model import pyfunc_model

pytestmark = pytest.mark.integration
AIRFLOW = str(Path(sys.executable).parent / "airflow")


def _start_run(conf: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(
        [AIRFLOW, "dags", "test", "bgremoval_training", "--conf", json.dumps(conf)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )


def test_reviewer_moves_an_image_renames_a_cluster_and_approves(s3_bucket, reviewer, client_for, tmp_path,
                                                                write_model_folder):
    bucket_url, options = s3_bucket
    bucket = bucket_url.removeprefix("s3://")
    model_name = f"review-flow-{bucket}"
    champion = registry.register_model(write_model_folder(tmp_path / "champion"), model_name, experiment="bgremoval-tests",
                                         pyfunc_model=pyfunc_model())
    assert registry.promote(model_name, champion["version"]) == {"champion": "1", "previous": None}
    generate_catalogue(storage.join(bucket_url, "raw", "rev-1"), SynthConfig(n=60, seed=11, max_side=360), options)
    run = _start_run(
        {
            "batch": "rev-1", "bucket": bucket, "working_size": 128, "shard_size": 30, "target_per_cluster": 14,
            "epochs": 1, "train_input_size": 64, "batch_size": 4, "workers": 2, "max_steps_per_epoch": 2,
            "iou_gate": 0.0, "cluster_iou_gate": 0.0, "tolerance": 1.0, "registered_model": model_name,
            "init_from": "scratch",  # the champion above is a tiny network: a full U2-NetP cannot start from it
        },
        tmp_path / "run.log",
    )
    try:
        detail = reviewer.wait_for_human_task("bgremoval_training", timeout=400)
        assert detail["subject"] == "Review the product clusters of batch rev-1"
        assert detail["options"] == ["Approve", "Reject"]
        link = re.search(r"/bgremoval/review/([A-Za-z0-9_-]+)\?bucket=([a-z0-9.-]+)", detail["body"])
        assert link and link.group(2) == bucket, detail["body"]
        version = link.group(1)
        api = f"/bgremoval/api/datasets/{version}"

        # Anonymous requests can neither read nor write; a viewer can read but not write.
        anonymous, viewer = client_for(None), client_for("viewer")
        rename = {"action": "rename", "cluster": 0, "name": "x"}
        assert anonymous.status("GET", f"{api}/clusters?bucket={bucket}") == 401
        assert anonymous.status("GET", f"{api}/thumbnails/any?bucket={bucket}") == 401
        assert anonymous.status("POST", f"{api}/corrections?bucket={bucket}", rename) == 401
        assert viewer.status("GET", f"{api}/clusters?bucket={bucket}") == 200
        assert viewer.status("POST", f"{api}/corrections?bucket={bucket}", rename) == 403

        state = reviewer.request("GET", f"{api}/clusters?bucket={bucket}")
        assert len(state["clusters"]) == 6
        source, target = state["clusters"][0], state["clusters"][1]
        moved_key = source["members"][0]["key"]
        thumb = reviewer.request("GET", f"{api}/thumbnails/{moved_key}?bucket={bucket}")
        assert thumb[:2] == b"\xff\xd8"

        move = {"action": "move", "key": moved_key, "to_cluster": target["cluster"]}
        state = reviewer.request("POST", f"{api}/corrections?bucket={bucket}", move)
        assert state["moved"] == 1
        rename = {"action": "rename", "cluster": target["cluster"], "name": "Trousers & co"}
        reviewer.request("POST", f"{api}/corrections?bucket={bucket}", rename)
        with pytest.raises(AirflowHTTPError) as refused:
            reviewer.request("POST", f"{api}/corrections?bucket={bucket}", {"action": "move", "key": "nope", "to_cluster": 0})
        assert refused.value.status == 422 and "unknown image key" in refused.value.body["detail"]

        log = read_corrections(f"{bucket_url}/datasets/{version}", options)
        assert [c.user for c in log] == ["reviewer", "reviewer"]

        reviewer.answer(detail, "Approve")
        assert run.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
        with pytest.raises(AirflowHTTPError) as closed:  # approval closed the review: a late change is refused
            reviewer.request("POST", f"{api}/corrections?bucket={bucket}", rename)
        assert closed.value.status == 409
    finally:
        if run.poll() is None:
            run.kill()

    manifest = read_table(f"{bucket_url}/datasets/{version}/manifest.parquet", options).set_index("key")
    assert manifest.loc[moved_key, "cluster"] == "Trousers & co"
    ok = manifest[manifest["status"] == "ok"]
    assert ok["cluster"].notna().all() and set(ok["split"]) == {"train", "val", "test"}
    augmented = read_table(f"{bucket_url}/datasets/{version}/augmented/manifest.parquet", options)
    assert len(augmented) > 0 and set(augmented["split"]) == {"train"}
    results = [o for o in storage.list_objects(f"{bucket_url}/training/{version}", options) if o.relpath.endswith("/result.json")]
    assert len(results) == 1  # the approved run went on to train
    trained = json.loads(storage.read_bytes(results[0].url, options))
    assert trained["world_size"] == 2 and trained["epochs_completed"] == 1 and trained["mlflow_run_id"]

    originals = ok[(ok["split"] == "train") & ~audit_excluded(ok)]["cluster"].value_counts()  # flagged masks are not augmented
    added = augmented["cluster"].value_counts().reindex(originals.index, fill_value=0)
    assert ((originals + added) == originals.clip(lower=14)).all()  # rare clusters topped up to the target

    # Evaluated against the champion on the test split, reported, gated and promoted.
    run_folder = results[0].url.rsplit("/", 1)[0]
    assessment = json.loads(storage.read_bytes(f"{run_folder}/report/assessment.json", options))
    assert assessment["gate"]["passed"] and assessment["champion"]["version"] == "1"
    test_pairs = ok["split"] == "test"
    flagged = int((test_pairs & audit_excluded(ok)).sum())
    assert assessment["summary"]["n"] == int(test_pairs.sum()) - flagged  # the gate scores trusted masks only
    assert len((assessment["audit"] or {}).get("left_out", [])) == flagged
    page = storage.read_bytes(f"{run_folder}/report/report.html", options).decode()
    assert "Gate PASSED" in page and "worst_gallery.jpg" in page
    report_path = f"/bgremoval/reports/{version_name(run_folder)}/{run_folder.rstrip('/').split('/')[-1]}?bucket={bucket}"
    assert "Gate PASSED" in reviewer.request("GET", report_path).decode()
    anonymous_page = client_for(None).request("GET", report_path)  # redirected to the login page
    assert b"Gate PASSED" not in anonymous_page
    assert f"report in the Airflow UI: " in (tmp_path / "run.log").read_text()
    run_id = quote(detail["task_instance"]["dag_run_id"], safe="")  # the run page's "Evaluation report" tab
    assert "Gate PASSED" in reviewer.request("GET", f"/bgremoval/reports/runs/bgremoval_training/{run_id}").decode()
    views = [v for p in reviewer.request("GET", "/api/v2/plugins")["plugins"] for v in p["external_views"]]
    assert {"name": "Evaluation report", "destination": "dag_run"}.items() <= next(
        v for v in views if v["name"] == "Evaluation report").items()
    assert registry.alias_version(model_name, "champion") == "2"
    assert registry.alias_version(model_name, "previous") == "1"
    version = mlflow.MlflowClient().get_model_version(model_name, "2")
    assert version.tags["dataset_version"] == version_name(run_folder)
    assert version.run_id == trained["mlflow_run_id"]
    run = mlflow.MlflowClient().get_run(trained["mlflow_run_id"])
    assert run.data.metrics["test_mean_iou"] == pytest.approx(assessment["summary"]["mean_iou"])
    assert "report/report.html" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}

    rolled = subprocess.run([str(Path(sys.executable).parent / "bgremoval"), "model", "rollback", "--name", model_name],
                            capture_output=True, text=True, env=dict(os.environ))
    assert rolled.returncode == 0, rolled.stderr
    assert "champion is version 1 again" in rolled.stdout
    assert registry.alias_version(model_name, "champion") == "1"


def version_name(run_folder: str) -> str:
    """The dataset version in ``s3://b/training/<version>/<run>``."""
    return run_folder.rstrip("/").split("/")[-2]
