"""The evaluation stage: challenger vs champion on one split, the gate, the report, MLflow."""

from __future__ import annotations

import os

import mlflow
import pytest

from tasks import registry
from tasks.evaluation.assessment import (
    AssessmentConfig,
    PromotionRefused,
    assess_challenger,
    calibrate_challenger,
    register_and_promote,
)
from tasks.evaluation.gate import GateConfig
from tasks.dev.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.process  # trains, exports or registers real models: tens of seconds



@pytest.fixture(scope="module")
def setting(tmp_path_factory, private_mlflow):
    """A dataset with a six-image test split, an SQLite MLflow store and a training run."""
    root = tmp_path_factory.mktemp("assess")
    dataset = str(root / "datasets" / "v1")
    write_synthetic_dataset(dataset, 10, seed=3, max_side=48, split_for=lambda i: "test" if i < 6 else "train",
                            cluster_for=lambda i, kind: "Trousers & co" if i == 0 else kind)
    with private_mlflow(root, "assess") as run_id:
        yield root, dataset, run_id


LENIENT = AssessmentConfig(gate=GateConfig(iou_gate=0.0, cluster_iou_gate=0.0, tolerance=1.0), registered_model="assess-m")


def test_first_challenger_passes_is_registered_and_becomes_champion(write_model_folder, setting):
    root, dataset, run_id = setting
    model = write_model_folder(root / "run1", seed=1, history=True)
    result = assess_challenger(model, dataset, str(root / "report1"), LENIENT, mlflow_run_id=run_id)
    assert result["gate"]["passed"] and result["champion"] is None
    assert result["summary"]["n"] == 6 and "mean IoU" in result["table"]
    files = sorted(os.listdir(root / "report1"))
    assert files == ["assessment.json", "cluster_iou.png", "iou_histogram.png", "report.html",
                     "training_curves.png", "worst_gallery.jpg"]
    page = (root / "report1" / "report.html").read_text()
    assert "Gate PASSED" in page and page.count("data:image/") == 4 and "Per product cluster" in page

    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.metrics["test_mean_iou"] == pytest.approx(result["summary"]["mean_iou"])
    assert run.data.tags["gate"] == "passed"
    assert run.data.metrics["test_iou_Trousers_co"] == result["summary"]["clusters"]["Trousers & co"]["mean_iou"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "report")}
    assert "report/report.html" in logged and "report/worst_gallery.jpg" in logged

    promoted = register_and_promote(result, "v1", LENIENT)
    assert promoted["champion"] == promoted["version"] == "1" and promoted["previous"] is None
    tags = mlflow.MlflowClient().get_model_version("assess-m", "1").tags
    assert tags["dataset_version"] == "v1" and float(tags["test_mean_iou"]) == pytest.approx(result["summary"]["mean_iou"], abs=1e-6)
    # the test photos' digest: a later challenger on the same photos meets this champion's record
    assert tags[registry.TEST_SPLIT_TAG] == result["test_split_sha256"] and result["best_champion"] is None
    assert registry.best_champion("assess-m", result["test_split_sha256"]) == {
        "version": "1", "mean_iou": pytest.approx(result["summary"]["mean_iou"], abs=1e-6)}
    assert registry.best_champion("assess-m", "other photos") is None
    # promote_model retried or cleared after it registered: no second version, the champion stays
    again = register_and_promote(result, "v1", LENIENT)
    assert (again["version"], again["champion"], again["registered_before"]) == ("1", "1", True)
    assert [str(v.version) for v in mlflow.MlflowClient().search_model_versions("name = 'assess-m'")] == ["1"]


def test_the_report_says_what_training_did_to_val_iou():
    from tasks.evaluation.assessment import training_facts

    assert training_facts({"start_val_iou": 0.9701, "metrics": {"val_iou": 0.9812}}) == {
        "val IoU": "97.01 % for the starting weights, 98.12 % after training"}
    lowered = training_facts({"start_val_iou": 0.97, "metrics": {"val_iou": 0.91}})["val IoU"]
    assert lowered.startswith("97.00 % for the starting weights, 91.00 % after training (training lowered it")
    assert training_facts({"start_val_iou": None, "metrics": {"val_iou": 0.9}}) == {}  # from random weights
    assert training_facts({}) == {}


def test_second_challenger_is_compared_with_the_champion_on_the_same_split(write_model_folder, setting):
    root, dataset, run_id = setting
    strict = AssessmentConfig(gate=GateConfig(iou_gate=0.0, cluster_iou_gate=0.0, tolerance=0.0), registered_model="assess-m")
    if registry.alias_version("assess-m") is None:
        pytest.skip("needs the champion registered by the previous test")
    champion_mean = assess_challenger(str(root / "run1"), dataset, str(root / "same"), strict)["summary"]["mean_iou"]
    other = write_model_folder(root / "run2", seed=2)
    result = assess_challenger(other, dataset, str(root / "report2"), strict)
    assert result["champion"]["version"] == "1"
    assert result["champion"]["mean_iou"] == pytest.approx(champion_mean)
    worse = result["summary"]["mean_iou"] < champion_mean
    assert result["gate"]["passed"] is (not worse)
    page = (root / "report2" / "report.html").read_text()
    assert "champion" in page and ("Gate FAILED" in page) is worse
    if worse:
        assert any("champion" in r for r in result["gate"]["reasons"])
        with pytest.raises(ValueError, match="gate did not pass"):
            register_and_promote(result, "v1", strict)
    else:
        assert register_and_promote(result, "v1", strict)["previous"] == "1"


def test_a_challenger_is_not_promoted_over_a_champion_it_was_not_compared_with(write_model_folder, setting, tmp_path):
    root, dataset, _ = setting
    config = AssessmentConfig(gate=GateConfig(iou_gate=0.0, cluster_iou_gate=0.0, tolerance=1.0), registered_model="race-m")
    first = assess_challenger(write_model_folder(tmp_path / "a", seed=1), dataset, str(tmp_path / "ra"), config)
    second = assess_challenger(write_model_folder(tmp_path / "b", seed=2), dataset, str(tmp_path / "rb"), config)
    assert first["champion"] is None and second["champion"] is None  # both evaluated before any promotion
    assert register_and_promote(first, "v1", config)["champion"] == "1"
    with pytest.raises(registry.ChampionMoved, match="champion is version 1 now"):
        register_and_promote(second, "v1", config)
    assert registry.alias_version("race-m") == "1"


def test_failing_thresholds_are_explained_in_the_report(write_model_folder, setting, tmp_path):
    root, dataset, _ = setting
    config = AssessmentConfig(gate=GateConfig(iou_gate=1.0, cluster_iou_gate=1.0), registered_model="nobody")
    result = assess_challenger(write_model_folder(tmp_path / "r", seed=5), dataset, str(tmp_path / "report"), config)
    assert not result["gate"]["passed"]
    assert result["gate"]["reasons"][0].startswith("mean IoU")
    assert "Gate FAILED: promotion skipped" in (tmp_path / "report" / "report.html").read_text()


def test_flagged_test_masks_are_left_out_of_the_gate_and_listed_with_both_figures(write_model_folder, tmp_path):
    from tasks.core.manifest import read_table, write_table

    dataset = str(tmp_path / "datasets" / "v2")
    write_synthetic_dataset(dataset, 6, seed=5, max_side=48, split_for=lambda i: "test")
    manifest = read_table(f"{dataset}/manifest.parquet")
    manifest["audit_reasons"] = ["speckle", "", "", "holes", "", ""]
    manifest["audit_decision"] = ["", "", "", "keep", "", ""]
    write_table(manifest, f"{dataset}/manifest.parquet")
    model = write_model_folder(tmp_path / "run", seed=1)
    config = AssessmentConfig(gate=GateConfig(iou_gate=0.0, cluster_iou_gate=0.0, tolerance=1.0),
                              registered_model="assess-audit")
    result = assess_challenger(model, dataset, str(tmp_path / "report"), config)
    assert result["summary"]["n"] == 5  # the kept one counts, the unreviewed flagged one does not
    audit = result["audit"]
    assert [p["stem"] for p in audit["left_out"]] == [manifest["stem"][0]] and audit["n_with"] == 6
    assert "with them: mean IoU" in result["table"] and manifest["stem"][0] in result["table"]
    assert "mask audit" in (tmp_path / "report" / "report.html").read_text()


def test_the_calibration_stage_logs_the_threshold_and_refinement_to_the_challengers_run(write_model_folder, private_mlflow, tmp_path):
    dataset = str(tmp_path / "datasets" / "v1")
    write_synthetic_dataset(dataset, 9, seed=8, max_side=48,
                            split_for=lambda i: "val" if i < 4 else "test" if i < 7 else "train")
    model = write_model_folder(tmp_path / "model")
    with private_mlflow(tmp_path, "calibrate") as run_id:
        calibration = calibrate_challenger({"model_url": model, "mlflow_run_id": run_id}, dataset, 0.97)
        run = mlflow.MlflowClient().get_run(run_id)
        metrics = run.data.metrics
    assert metrics["quality_threshold"] == pytest.approx(calibration["threshold"])
    choice = calibration["refinement"]
    assert run.data.tags["edge_refinement"] == ("on" if choice["refine"] else "off")
    assert metrics["refine_val_refined_mean_iou"] == pytest.approx(choice["refined_mean_iou"])
    assert metrics["refine_test_plain_mean_iou"] == pytest.approx(calibration["refinement_test"]["plain_mean_iou"])
    assert metrics["routing_test_recall"] == pytest.approx(calibration["test"]["recall"])
    assert metrics["routing_val_precision"] == pytest.approx(calibration["val"]["precision"])
    assert "quality threshold" in calibration["text"]


def test_the_test_pairs_digest_changes_with_a_mask_and_not_with_the_version(tmp_path):
    from tasks.evaluation.assessment import split_sha256
    from tasks.evaluation.metrics import ImageScore
    from tasks.core.manifest import read_table

    digests = []
    for version in ("v1", "v2"):  # a retraining's version keeps the test pairs as they were
        dataset = str(tmp_path / "datasets" / version)
        write_synthetic_dataset(dataset, 4, seed=7, max_side=48, split_for=lambda i: "test")
        manifest = read_table(f"{dataset}/manifest.parquet")
        scores = [ImageScore(str(key), "c", 0.9, 0.1, 0.9) for key in manifest["key"]]
        digests.append(split_sha256(dataset, "test", scores))
    assert digests[0] == digests[1]
    fixed = manifest["mask_url"][0]  # a reviewer's fix of one test mask: another record
    with open(fixed, "rb") as fh:
        data = fh.read()
    with open(fixed, "wb") as fh:
        fh.write(data + b"\0")
    assert split_sha256(dataset, "test", scores) != digests[0]


def test_a_cleared_promotion_does_not_undo_a_rollback(write_model_folder, setting, tmp_path):
    root, dataset, _ = setting
    config = AssessmentConfig(gate=GateConfig(iou_gate=0.0, cluster_iou_gate=0.0, tolerance=1.0), registered_model="rb-m")
    first = assess_challenger(write_model_folder(tmp_path / "a", seed=1), dataset, str(tmp_path / "ra"), config)
    register_and_promote(first, "v1", config)
    second = assess_challenger(write_model_folder(tmp_path / "b", seed=2), dataset, str(tmp_path / "rb"), config)
    register_and_promote(second, "v1", config)
    registry.rollback("rb-m", user="ops")
    with pytest.raises(PromotionRefused, match="was rolled back at .*not promoted again"):
        register_and_promote(second, "v1", config)  # promote_model cleared after the rollback
    assert registry.alias_version("rb-m") == "1"
