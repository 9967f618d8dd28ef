"""Registry: register (PyTorch + ONNX), promote with aliases, roll back, download — on a real
MLflow SQLite store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import onnxruntime as ort
import pytest
import torch

from tasks import registry
from tasks.evaluation.scoring import load_model
from tasks.model.refine_choice import choose_refinement, load_refine_choice, save_refine_choice
from tasks.serving.engines import refinement_for
from tasks.serving.mlflow_model import pyfunc_model

pytestmark = pytest.mark.process  # trains, exports or registers real models: tens of seconds

SIZE = 32


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, private_mlflow):
    """A private SQLite tracking store for this module; yields ``(run_id, folder)``."""
    folder = tmp_path_factory.mktemp("mlflow")
    with private_mlflow(folder, "t") as run_id:
        yield run_id, folder


@pytest.fixture(scope="module")
def three_versions(tracking, write_model_folder):
    """Three tiny models registered as versions 1-3 of ``m`` (registering exports ONNX: ~10 s each)."""
    run_id, folder = tracking
    versions = []
    for i in range(3):
        model = write_model_folder(folder / f"run{i}", seed=i)
        if i == 2:  # the last one was calibrated: its refinement did not pay
            save_refine_choice(choose_refinement([0.99], [0.98], "val"), model)
        versions.append(registry.register_model(model, "m", run_id=run_id, pyfunc_model=pyfunc_model(),
                                                tags={"mean_iou": 0.5 + i / 10, "dataset_version": f"d{i}"}))
    return versions


def test_register_logs_pytorch_and_onnx_with_tags(tmp_path, tracking, three_versions):
    first = three_versions[0]
    assert [v["version"] for v in three_versions] == ["1", "2", "3"]
    client = mlflow.MlflowClient()
    tags = client.get_model_version("m", "1").tags
    assert tags["mean_iou"] == "0.500000" and tags["dataset_version"] == "d0" and tags["onnx_sha256"] == first["onnx_sha256"]
    assert tags["input_size"] == str(SIZE)

    folder = registry.download_model(registry.model_uri("m", version="1"), str(tmp_path / "dl"))
    assert sorted(os.listdir(folder)) == ["config.json", "model.onnx", "model.pt"]
    model, meta = load_model(folder)
    original, _ = load_model(str(tracking[1] / "run0"))
    for a, b in zip(model.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)
    assert meta["input_size"] == SIZE and meta["model_widths"] == {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}

    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    onnx_out = ort.InferenceSession(os.path.join(folder, "model.onnx")).run(None, {"input": x})[0]
    assert onnx_out.shape == (2, 1, SIZE, SIZE)


def test_the_registered_model_is_a_pyfunc_from_code_that_cuts_out_image_bytes(tmp_path, three_versions):
    local = mlflow.artifacts.download_artifacts("models:/m/1", dst_path=str(tmp_path / "model"))
    logged = [os.path.relpath(os.path.join(d, f), local) for d, _, files in os.walk(local) for f in files]
    assert not [f for f in logged if f.endswith((".pkl", ".pickle", ".cloudpickle"))], logged
    assert {"artifacts/model.onnx", "artifacts/model.pt", "artifacts/config.json",
            "code/tasks/serving/mlflow_model.py"} <= set(logged)
    flavor = mlflow.models.Model.load(os.path.join(local, "MLmodel")).flavors["python_function"]
    assert flavor["model_code_path"].endswith("mlflow_model_code.py")

    pyfunc = mlflow.pyfunc.load_model("models:/m/1")
    inputs = pyfunc.metadata.get_input_schema()
    assert inputs.input_names() == ["image"] and inputs.inputs[0].type.name == "binary"
    assert [p.name for p in pyfunc.metadata.get_params_schema().params] == ["output", "background", "decontaminate",
                                                                             "refine"]
    photo = cv2.imencode(".jpg", np.full((40, 30, 3), 200, np.uint8))[1].tobytes()
    rows = pyfunc.predict(pd.DataFrame({"image": [photo, b"not an image"]}), params={"output": "mask"})
    assert list(rows.columns) == ["output", "media_type", "quality", "error"]
    mask = cv2.imdecode(np.frombuffer(rows["output"][0], np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (40, 30) and rows["media_type"][0] == "image/png" and rows["error"][0] == ""
    assert 0 <= rows["quality"][0] <= 1
    assert rows["output"][1] == b"" and "not an image" in rows["error"][1]
    raw = pyfunc.predict(pd.DataFrame({"image": [photo]}), params={"output": "mask", "refine": "off"})
    assert cv2.imdecode(np.frombuffer(raw["output"][0], np.uint8), cv2.IMREAD_UNCHANGED).shape == (40, 30)
    cutout = pyfunc.predict(pd.DataFrame({"image": [photo]}))  # the default output: the RGBA cut-out
    assert cv2.imdecode(np.frombuffer(cutout["output"][0], np.uint8), cv2.IMREAD_UNCHANGED).shape == (40, 30, 4)


def test_the_measured_refinement_choice_travels_with_the_model(tmp_path, three_versions):
    folder = registry.download_model("models:/m/3", str(tmp_path / "dl3"))
    assert load_refine_choice(folder) == choose_refinement([0.99], [0.98], "val")
    engine = mlflow.pyfunc.load_model("models:/m/3").unwrap_python_model().engine
    assert refinement_for(engine) == (None, load_refine_choice(folder).describe())  # the pyfunc's auto: off
    assert load_refine_choice(registry.download_model("models:/m/1", str(tmp_path / "dl1"))) is None


def test_promotion_moves_champion_and_previous_then_rollback_walks_back(three_versions, capsys):
    assert registry.alias_version("m", registry.CHAMPION) is None
    assert registry.promote("m", "1") == {"champion": "1", "previous": None}
    assert registry.promote("m", "2", user="ana") == {"champion": "2", "previous": "1"}
    assert registry.promote("m", "2") == {"champion": "2", "previous": "1"}  # idempotent
    assert registry.promote("m", "3") == {"champion": "3", "previous": "2"}
    listed = {row["version"]: row["aliases"] for row in registry.list_versions("m")}
    assert listed == {"3": [registry.CHAMPION], "2": [registry.PREVIOUS], "1": []}  # what `model list` shows
    tags = mlflow.MlflowClient().get_model_version("m", "2").tags
    assert tags["promoted_by"] == "ana" and "promoted_at" in tags

    assert registry.rollback("m", user="ops") == {"champion": "2", "demoted": "3", "previous": "1"}
    assert registry.alias_version("m", registry.CHAMPION) == "2"
    assert registry.alias_version("m", registry.PREVIOUS) == "1"
    assert mlflow.MlflowClient().get_model_version("m", "3").tags["rolled_back_by"] == "ops"
    assert registry.rollback("m") == {"champion": "1", "demoted": "2", "previous": None}
    assert registry.alias_version("m", registry.PREVIOUS) is None
    with pytest.raises(ValueError, match="no 'previous' version"):
        registry.rollback("m")
    # `model list` says which versions were rolled back; promoted again, a version loses the mark
    from tasks.cli.main import main

    capsys.readouterr()
    assert main(["model", "list", "--name", "m"]) == 0
    listing = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("version")}
    assert "rolled back" in listing["3"] and "by ops" in listing["3"] and "rolled back" not in listing["1"]
    registry.promote("m", "3", user="ops")
    assert not set(registry.ROLLBACK_TAGS) & set(registry.version_tags("m", "3"))
    registry.rollback("m")  # the next tests start from version 1 as the champion
    assert registry.alias_version("m", registry.CHAMPION) == "1"
    # a rollback that gives the alias back to a version rolled back before clears its mark too
    registry.promote("m", "2")
    registry.promote("m", "1")
    registry.rollback("m")  # 1 demoted (marked), 2 restored
    registry.rollback("m")  # 2 demoted, 1 restored: the champion is not "rolled back"
    assert registry.alias_version("m", registry.CHAMPION) == "1" and registry.rolled_back_versions("m") == ["3", "2"]
    # never the deprecated stages
    assert all(v.current_stage in ("None", None) for v in mlflow.MlflowClient().search_model_versions("name='m'"))


def test_promotion_is_compare_and_set_against_the_champion_it_was_compared_with(three_versions):
    assert registry.promote("m", "1", expected_champion=None) == {"champion": "1", "previous": None}
    with pytest.raises(registry.ChampionMoved, match="version 1 now, not version None"):
        registry.promote("m", "2", expected_champion=None)  # evaluated when there was no champion
    assert registry.alias_version("m", registry.CHAMPION) == "1"
    assert registry.promote("m", "2", expected_champion="1") == {"champion": "2", "previous": "1"}
    with pytest.raises(registry.ChampionMoved):
        registry.promote("m", "3", expected_champion="1")  # another run promoted 2 meanwhile
    assert registry.alias_version("m", registry.CHAMPION) == "2"


def test_concurrent_promotions_lose_no_history_event(three_versions):
    from concurrent.futures import ThreadPoolExecutor

    def events() -> int:
        return sum(k.startswith("champion_history.") for k in mlflow.MlflowClient().get_registered_model("m").tags)

    before, stack = events(), registry._history(mlflow.MlflowClient(), "m")
    with ThreadPoolExecutor(max_workers=4) as pool:  # unserialised writers: every event must survive
        list(pool.map(lambda v: registry._log_history(mlflow.MlflowClient(), "m", "promote", v, "t"), ["2", "3"] * 4))
    assert events() == before + 8
    history = registry._history(mlflow.MlflowClient(), "m")
    assert history[:len(stack)] == stack and sorted(history[len(stack):]) == ["2"] * 4 + ["3"] * 4


def test_rollback_without_champion_is_a_clear_error(tracking):
    with pytest.raises(ValueError, match="no 'champion' alias"):
        registry.rollback("nothing-here")


def test_download_of_a_foreign_model_names_the_missing_files(tmp_path, tracking):
    run_id, _ = tracking
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(torch.nn.Linear(2, 1), name="plain", registered_model_name="plain",
                                 serialization_format="pickle", pip_requirements=["torch"])
    with pytest.raises(FileNotFoundError, match="model.pt, config.json, model.onnx"):
        registry.download_model("models:/plain/1", str(tmp_path / "x"))


def test_a_model_version_or_alias_not_in_the_registry_is_named_as_such(tmp_path, three_versions, capsys):
    from tasks.cli.main import main

    for uri, reason in (("models:/absent@champion", "name=absent not found"), ("models:/m/99", "version=99) not found"),
                        ("models:/m@nope", "alias nope not found")):
        with pytest.raises(FileNotFoundError) as raised:
            registry.download_model(uri, str(tmp_path / "x"))
        assert f"{uri} is not in the registry at " in str(raised.value) and reason in str(raised.value)
    assert main(["remove", str(tmp_path), "-o", str(tmp_path / "out"), "--model", "models:/absent@champion"]) == 2
    assert "models:/absent@champion is not in the registry" in capsys.readouterr().err


def test_stage_weights_writes_the_champions_state_dict(tmp_path, three_versions):
    registry.promote("m", "1")
    staged = registry.stage_weights("champion", str(tmp_path / "init"), name="m")
    assert staged == str(tmp_path / "init" / "model.pt")
    state = torch.load(staged, weights_only=True)
    folder = registry.download_model("models:/m/1", str(tmp_path / "dl1"))
    assert all(torch.equal(a, b) for a, b in zip(state.values(), torch.load(f"{folder}/model.pt", weights_only=True).values()))
    assert registry.stage_weights("s3://b/x/model.pt", str(tmp_path / "unused")) == "s3://b/x/model.pt"
    with pytest.raises(ValueError, match="no 'nope' alias"):
        registry.stage_weights("@nope", str(tmp_path / "x"), name="m")
    # What a run starts from: the champion staged under the run's init/, a file as given, or nothing.
    run = str(tmp_path / "run")
    assert registry.start_weights("champion", "u2netp", "m", run) == ("champion", f"{run}/init/model.pt")
    assert registry.start_weights("s3://b/x/model.pt", "u2netp", "m", run) == ("s3://b/x/model.pt", "s3://b/x/model.pt")
    assert registry.start_weights("scratch", "u2netp", "m", run) == (None, None)


def test_cli_evaluates_and_lists_registered_models(tmp_path, three_versions, capsys):
    from tasks.cli.main import main
    from tasks.dev.synth import SynthConfig, generate_catalogue

    generate_catalogue(str(tmp_path / "labelled"), SynthConfig(n=2, seed=4, max_side=80))
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--model", "models:/m/2", "--images", str(tmp_path / "labelled" / "images"),
                 "--masks", str(tmp_path / "labelled" / "masks"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["n"] == 2 and summary["model_url"] == "models:/m/2" and summary["input_size"] == SIZE
    onnx_out = tmp_path / "onnx.json"
    onnx_file = os.path.join(registry.download_model("models:/m/2", str(tmp_path / "m2")), "model.onnx")
    assert main(["evaluate", "--model", onnx_file, "--images", str(tmp_path / "labelled" / "images"),
                 "--masks", str(tmp_path / "labelled" / "masks"), "--json", str(onnx_out)]) == 0
    exported = json.loads(onnx_out.read_text())
    assert exported["mean_iou"] == pytest.approx(summary["mean_iou"], abs=1e-3)  # the ONNX export scores the same
    assert main(["model", "list", "--name", "m"]) == 0
    listing = capsys.readouterr().out
    assert "version    3" in listing and "dataset d2" in listing
    assert main(["model", "list", "--name", "absent"]) == 2


def test_auto_start_skips_a_champion_of_another_architecture(tracking, write_model_folder, monkeypatch):
    run_id, folder = tracking
    on_disk = {"u2netp": "/weights/u2netp.onnx"}  # U2-Net's published file not fetched here
    monkeypatch.setattr("tasks.model.published.find_pretrained_onnx",
                        lambda path=None, model="u2netp": on_disk.get(model))
    assert registry.choose_start("auto", "u2netp", "arch") == "pretrained"  # no registered model yet
    assert registry.training_recipe("arch") == {}
    run_folder = Path(write_model_folder(folder / "arch"))
    (run_folder / "result.json").write_text(json.dumps({"config": {"loss": "wbce+wiou"}, "metrics": {"val_iou": 0.9}}))
    tiny = registry.register_model(str(run_folder), "arch", run_id=run_id, pyfunc_model=pyfunc_model())
    registry.promote("arch", tiny["version"])
    client = mlflow.MlflowClient()
    assert json.loads(client.get_model_version("arch", tiny["version"]).tags["model_widths"])["encoder"]
    recipe = registry.training_recipe("arch")  # what a retraining run inherits
    assert {k: recipe[k] for k in ("version", "model", "input_size", "loss")} == {
        "version": tiny["version"], "model": "u2netp", "input_size": 32, "loss": "wbce+wiou"}
    assert recipe["model_widths"]["encoder"]
    assert registry.choose_start("auto", "u2netp", "arch") == "pretrained"  # custom widths: not a U2-NetP start
    client.delete_model_version_tag("arch", tiny["version"], "model_widths")  # as a standard U2-NetP reads
    assert registry.training_recipe("arch")["model_widths"] is None
    assert registry.choose_start("auto", "u2netp", "arch") == "champion"
    assert registry.choose_start("auto", "u2net", "arch") is None  # a U2-NetP champion; U2-Net's file not here
    assert registry.choose_start("champion", "u2netp", "arch") == "champion"  # asked for by name: as it is
    with pytest.raises(ValueError, match="champion of 'arch' is a u2netp, this run trains a u2net"):
        registry.choose_start("champion", "u2net", "arch")  # its weights would not load: refused before staging


def test_cli_registers_a_training_run_with_its_test_figures(tmp_path, tracking, write_model_folder, capsys,
                                                            monkeypatch):
    """`bgremoval model register`: a run trained from the command line becomes a version, scored on the
    dataset's test split first so that `model list` shows its figure, then promotes by its number. Its
    files go beside the SQLite store, not into the folder the command runs in (MLflow's ./mlruns)."""
    from tasks.cli.main import main
    from tasks.dev.synthetic import write_synthetic_dataset

    dataset = tmp_path / "datasets" / "v9"
    write_synthetic_dataset(str(dataset), 4, seed=1, max_side=48, split_for=lambda i: "test")
    run = write_model_folder(tmp_path / "cli-run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("BGREMOVAL_MLFLOW_ARTIFACTS", raising=False)
    assert main(["model", "register", "--name", "cli", "--run", run, "--dataset", str(dataset)]) == 0
    assert not any(elsewhere.iterdir())
    _, folder = tracking
    assert list((folder / "mlflow-artifacts").rglob("model.onnx"))
    out = capsys.readouterr().out
    assert "cli: registered version 1" in out and "next: bgremoval model promote --name cli --version 1" in out
    tags = registry.version_tags("cli", "1")
    assert tags["dataset_version"] == "v9" and 0.0 <= float(tags["test_mean_iou"]) <= 1.0
    assert main(["model", "promote", "--name", "cli", "--version", "1"]) == 0
    assert main(["model", "list", "--name", "cli"]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "test mean IoU" in listing and "dataset v9" in listing
    assert main(["model", "register", "--name", "cli", "--run", run]) == 0  # the same weights again
    assert "are version 1 already" in capsys.readouterr().out and registry.list_versions("cli")[0]["version"] == "1"
    again = registry.register_model(run, "cli", tags={"test_mean_iou": 0.5, "dataset_version": "v10", "source": "x"},
                                    pyfunc_model=pyfunc_model())
    tags = registry.version_tags("cli", "1")  # the earlier figures stand; the identity cannot be overridden
    assert again["registered_before"] and tags["dataset_version"] == "v9" and tags["source"] == run
    assert main(["model", "register", "--name", "cli"]) == 2  # --run is needed
    assert main(["model", "register", "--name", "cli", "--run", str(tmp_path / "nothing")]) == 2


def test_a_registration_killed_before_its_tags_is_found_again(tmp_path, tracking, write_model_folder, monkeypatch):
    """The version is created with its identity (source, ONNX SHA-256): a promote task killed right
    after the version exists, before any other tag, registers nothing new when retried."""
    from mlflow import MlflowClient

    run_id, _ = tracking
    run = write_model_folder(tmp_path / "killed")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the task was killed")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_model_version_tag", killed)
        with pytest.raises(KeyboardInterrupt):
            registry.register_model(run, "killed", run_id=run_id, pyfunc_model=pyfunc_model(), tags={"dataset_version": "v1"})
    assert [v["version"] for v in registry.list_versions("killed")] == ["1"]
    again = registry.register_model(run, "killed", run_id=run_id, pyfunc_model=pyfunc_model(), tags={"dataset_version": "v1"})
    assert again["registered_before"] and again["version"] == "1"
    assert [v["version"] for v in registry.list_versions("killed")] == ["1"]
    assert registry.version_tags("killed", "1")["dataset_version"] == "v1"


def test_promoting_a_version_known_to_be_worse_by_hand_needs_force(tmp_path, tracking, write_model_folder, capsys):
    """`bgremoval model promote` refuses, with the reasons, a version whose training lowered its val IoU
    below its start's (the figures come from the run's result.json at registration) or that scores below
    the champion on the same dataset's test split; --force promotes it and records why."""
    from tasks.cli.main import main

    run_id, _ = tracking
    good = write_model_folder(tmp_path / "good")
    worse = write_model_folder(tmp_path / "worse", seed=1)
    (Path(worse) / "result.json").write_text(json.dumps({"start_val_iou": 0.93, "metrics": {"val_iou": 0.91}}))
    first = registry.register_model(good, "guarded", run_id=run_id, pyfunc_model=pyfunc_model(),
                                    tags={"dataset_version": "v1", "test_mean_iou": 0.95})
    registry.promote("guarded", first["version"])
    second = registry.register_model(worse, "guarded", run_id=run_id, pyfunc_model=pyfunc_model(),
                                     tags={"dataset_version": "v1", "test_mean_iou": 0.94})
    assert registry.version_tags("guarded", second["version"])["start_val_iou"] == "0.930000"
    concerns = registry.promotion_concerns("guarded", second["version"])
    assert concerns == ["training lowered its val IoU below its starting weights' (91.00 % < 93.00 %)",
                        "it scores below the champion (version 1) on the test split of dataset v1: 94.000 % < 95.000 %"]
    assert registry.promotion_concerns("guarded", first["version"]) == []
    assert main(["model", "promote", "--name", "guarded", "--version", second["version"]]) == 2
    err = capsys.readouterr().err
    assert "94.000 % < 95.000 %" in err and "--force promotes it anyway" in err
    assert registry.alias_version("guarded", registry.CHAMPION) == first["version"]
    assert main(["model", "promote", "--name", "guarded", "--version", second["version"], "--force"]) == 0
    assert registry.alias_version("guarded", registry.CHAMPION) == second["version"]
    reason = registry.version_tags("guarded", second["version"])["promotion_reason"]
    assert reason.startswith("promoted by hand despite: training lowered its val IoU")
    # the old champion, scored on the same data, is not worse than the one now holding the alias
    assert registry.promotion_concerns("guarded", first["version"]) == []


def test_an_alias_is_pinned_to_its_version_and_a_name_may_hold_an_at(three_versions):
    registry.promote("m", "1")
    assert registry.pinned_uri("models:/m@champion") == "models:/m/1"
    assert registry.pinned_uri("models:/m/2") == "models:/m/2"
    assert registry.pinned_uri("models:/team@shop/3") == "models:/team@shop/3"  # version 3 of "team@shop"
    assert registry.pinned_uri("/runs/r1/model.onnx") == "/runs/r1/model.onnx"
    with pytest.raises(FileNotFoundError, match="no registered model 'm' with the alias 'nope'"):
        registry.pinned_uri("models:/m@nope")


def test_the_best_champion_counts_since_the_last_intervention_by_hand(tracking, tmp_path):
    """The gate's record: the best champion on the same test photos; a rollback or a promotion by hand
    sets a new baseline, and a rolled-back version never counts."""
    client = mlflow.MlflowClient()
    client.create_registered_model("rec")
    figures = {"1": ("0.980000", "2026-03-01T10:00:00+00:00", "gate passed"),
               "2": ("0.978000", "2026-03-02T10:00:00+00:00", "gate passed"),
               "3": ("0.990000", None, None)}  # never champion
    for version, (iou, at, reason) in figures.items():
        client.create_model_version("rec", str(tmp_path))
        client.set_model_version_tag("rec", version, "test_mean_iou", iou)
        client.set_model_version_tag("rec", version, registry.TEST_SPLIT_TAG, "photos-a")
        if at:
            client.set_model_version_tag("rec", version, "promoted_at", at)
            client.set_model_version_tag("rec", version, "promotion_reason", reason)
    assert registry.best_champion("rec", "photos-a") == {"version": "1", "mean_iou": 0.98}
    assert registry.best_champion("rec", "photos-b") is None and registry.best_champion("no-such", "x") is None
    # version 2 chosen by hand: the baseline is what the person chose, not version 1 before it
    client.set_model_version_tag("rec", "2", "promoted_at", "2026-03-03T10:00:00+00:00")
    client.set_model_version_tag("rec", "2", "promotion_reason", registry.BY_HAND)
    assert registry.best_champion("rec", "photos-a") == {"version": "2", "mean_iou": 0.978}
    client.set_model_version_tag("rec", "2", registry.ROLLBACK_TAGS[0], "2026-03-04T10:00:00Z")  # "Z" read too
    assert registry.best_champion("rec", "photos-a") is None
    # the version a rollback restores is champion from then on: it counts
    client.set_model_version_tag("rec", "1", "promoted_at", "2026-03-04T10:00:00+00:00")
    assert registry.best_champion("rec", "photos-a") == {"version": "1", "mean_iou": 0.98}
    # the alias moved outside promote() (the MLflow UI) to a version promoted earlier: only it counts
    client.set_model_version_tag("rec", "3", "promoted_at", "2026-03-05T10:00:00+00:00")
    client.set_model_version_tag("rec", "3", "promotion_reason", "gate passed")
    client.set_registered_model_alias("rec", registry.CHAMPION, "1")
    assert registry.best_champion("rec", "photos-a") == {"version": "1", "mean_iou": 0.98}
    client.set_registered_model_alias("rec", registry.CHAMPION, "3")
    assert registry.best_champion("rec", "photos-a") == {"version": "3", "mean_iou": 0.99}


def test_a_champion_moved_in_the_mlflow_ui_stays_the_baseline_after_the_next_promotion(tracking, tmp_path):
    client = mlflow.MlflowClient()
    client.create_registered_model("ui")
    for version, iou in (("1", "0.900000"), ("2", "0.950000"), ("3", "0.910000")):
        client.create_model_version("ui", str(tmp_path))
        client.set_model_version_tag("ui", version, "test_mean_iou", iou)
        client.set_model_version_tag("ui", version, registry.TEST_SPLIT_TAG, "pairs")
    registry.promote("ui", "1")
    client.set_model_version_tag("ui", "1", "promoted_at", "2026-01-01T00:00:00+00:00")  # long before version 2
    registry.promote("ui", "2")
    client.set_model_version_tag("ui", "2", "promoted_at", "2026-01-02T00:00:00+00:00")  # a day before the move
    client.set_registered_model_alias("ui", registry.CHAMPION, "1")  # by hand, outside promote()
    assert registry.best_champion("ui", "pairs") == {"version": "1", "mean_iou": 0.9}
    registry.promote("ui", "3", expected_champion="1")  # the gate's next promotion sees the move
    assert registry.best_champion("ui", "pairs") == {"version": "3", "mean_iou": 0.91}  # not version 2's 0.95
