"""The ``bgremoval`` command line on local folders (no servers needed)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from tasks.cli.main import main
from tasks.model.config import StageWidths, U2NetConfig
from tasks.model.refine_choice import choose_refinement, save_refine_choice
from tasks.model.u2net import U2Net
from tasks.dev.synth import SynthConfig, generate_catalogue
from tasks.train.config import TrainConfig

TINY = [[4, 8]] * 6, [[4, 8]] * 5


def test_synth_then_clean_prints_the_summary(tmp_path, capsys):
    batch = tmp_path / "bucket" / "raw" / "b"
    assert main(["synth", "--n", "8", "--bad", "5", "--max-side", "200", "--out", str(batch)]) == 0
    assert (batch / "_READY").exists()
    assert main(["synth", "--n", "8", "--out", str(batch)]) == 2  # a finished batch is not overwritten
    assert main(["clean", "--bucket", str(tmp_path / "bucket"), "--batch", "b", "--working-size", "96"]) == 0
    out = capsys.readouterr().out
    assert "pairs in" in out and "quarantined" in out and "missing_mask" in out
    dataset = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("dataset: "))
    assert "  quarantined " in out and f"next: bgremoval split --dataset {dataset}" in out  # which files, and what next
    assert main(["clean", "--bucket", str(tmp_path / "bucket"), "--batch", "nope"]) == 2  # a line, not a traceback
    assert "bgremoval clean: " in capsys.readouterr().err

    assert main(["split", "--dataset", dataset, "--val", "0.25", "--test", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "splits written into" in out and "total" in out
    from tasks.core.manifest import read_table

    manifest = read_table(f"{dataset}/manifest.parquet")
    assert set(manifest.loc[manifest["status"] == "ok", "split"]) <= {"train", "val", "test"}
    assert main(["split", "--dataset", dataset, "--val", "0.7", "--test", "0.7"]) == 2  # fractions over one
    assert main(["split", "--dataset", str(tmp_path / "nowhere")]) == 2

    from tasks.core.manifest import write_table

    ok = manifest["status"] == "ok"
    first = manifest.loc[ok, "split"].copy()
    carried = first.index[first != "test"][0]
    manifest.loc[carried, "split"] = "test"  # as if its test split had come from an earlier version
    write_table(manifest, f"{dataset}/manifest.parquet")
    capsys.readouterr()
    assert main(["split", "--dataset", dataset, "--val", "0.1", "--test", "0.1"]) == 0  # splits again: none move
    assert f"{int(ok.sum())} pairs kept the split they had" in capsys.readouterr().out
    again = read_table(f"{dataset}/manifest.parquet")
    assert again.loc[carried, "split"] == "test"
    assert (again.loc[ok, "split"] == manifest.loc[ok, "split"]).all()
    assert main(["split", "--dataset", dataset, "--fresh", "--val", "0.25", "--test", "0.25"]) == 0
    assert (read_table(f"{dataset}/manifest.parquet").loc[ok, "split"] == first).all()  # the hash's own split


def test_clean_takes_a_relative_bucket_and_a_pixel_limit(tmp_path, monkeypatch, capsys):
    """`clean --bucket ./data` writes a manifest whose URLs work from anywhere (it used to store
    './datasets/...', which every later command joined onto the dataset folder), and
    --max-megapixels sets the limit a studio's larger frames need."""
    from tasks.core.manifest import read_table

    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--n", "4", "--max-side", "200", "--out", "data/raw/b"]) == 0
    assert main(["clean", "--bucket", "./data", "--batch", "b", "--working-size", "96",
                 "--max-megapixels", "0.01"]) == 0
    out = capsys.readouterr().out
    dataset = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("dataset: "))
    assert dataset.startswith(str(tmp_path / "data" / "datasets"))
    manifest = read_table(f"{dataset}/manifest.parquet")
    assert set(manifest["reason"].dropna()) == {"image_too_large"}  # every photo is over 10,000 pixels
    assert all(url.startswith(str(tmp_path)) for url in manifest["image_source"])


def test_evaluate_scores_a_dataset_split_as_the_gate_does(tmp_path, capsys, write_model_folder, monkeypatch):
    from tasks.dev.synthetic import write_synthetic_dataset

    dataset = tmp_path / "datasets" / "v1"
    write_synthetic_dataset(str(dataset), 6, seed=3, max_side=48, split_for=lambda i: "test" if i < 4 else "train")
    model = write_model_folder(tmp_path / "run")
    out_json = tmp_path / "scores.json"
    monkeypatch.chdir(tmp_path)  # a relative dataset path works as any path does
    assert main(["evaluate", "--model", model, "--dataset", "datasets/v1", "--json", str(out_json)]) == 0
    summary = json.loads(out_json.read_text())
    assert summary["n"] == 4 and summary["split"] == "test"
    assert main(["evaluate", "--model", model, "--dataset", str(dataset), "--images", str(tmp_path)]) == 2
    assert main(["evaluate", "--model", model]) == 2
    assert main(["evaluate", "--model", model, "--dataset", str(dataset), "--refine"]) == 2
    assert "give --images and --masks" in capsys.readouterr().err

    from tasks.core.manifest import read_table, write_table

    manifest = read_table(f"{dataset}/manifest.parquet")
    manifest.loc[manifest.index[0], "audit_reasons"] = "speckle"  # a test pair's mask, flagged, not reviewed
    write_table(manifest, f"{dataset}/manifest.parquet")
    assert main(["evaluate", "--model", model, "--dataset", "datasets/v1", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["n"] == 3  # the gate leaves it out too; the command says so
    assert "1 pairs whose mask the audit flagged are left out (test 1)" in capsys.readouterr().err


def test_evaluate_prints_the_seed_table_and_writes_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    widths = {"encoder": TINY[0], "decoder": TINY[1]}
    model = U2Net(U2NetConfig(encoder=tuple(StageWidths(*w) for w in TINY[0]), decoder=tuple(StageWidths(*w) for w in TINY[1])))
    torch.save(model.state_dict(), run / "model.pt")
    config = TrainConfig(dataset_url="unused", output_url=str(run), model_widths=widths, input_size=64)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    generate_catalogue(str(tmp_path / "labelled"), SynthConfig(n=3, seed=2, max_side=120))
    out_json = tmp_path / "scores.json"
    code = main([
        "evaluate", "--model", str(run / "model.pt"), "--images", str(tmp_path / "labelled" / "images"),
        "--masks", str(tmp_path / "labelled" / "masks"), "--json", str(out_json),
    ])
    assert code == 0
    summary = json.loads(out_json.read_text())
    assert summary["n"] == 3 and 0.0 <= summary["mean_iou"] <= 1.0
    assert "mean IoU" in capsys.readouterr().out
    assert np.isfinite(summary["mean_mae"]) and summary["refined"] is False
    assert summary["edge_refinement"].startswith("off (the default: the network's own map")
    assert main(["evaluate", "--model", str(run / "model.pt"), "--images", str(tmp_path / "labelled" / "images"),
                 "--masks", str(tmp_path / "labelled" / "masks"), "--json", str(out_json), "--refine"]) == 0
    refined = json.loads(out_json.read_text())
    assert refined["refined"] is True and refined["n"] == 3 and 0.0 <= refined["mean_iou"] <= 1.0
    assert refined["edge_refinement"] == "on (asked for)" and "edge refinement: on (asked for)" in capsys.readouterr().out
    # what cannot be scored is a message and status 2, not a traceback
    assert main(["evaluate", "--model", str(tmp_path / "nothing.pt"), "--images", str(tmp_path / "labelled" / "images"),
                 "--masks", str(tmp_path / "labelled" / "masks")]) == 2
    assert main(["evaluate", "--model", str(run), "--images", str(tmp_path / "nowhere"),
                 "--masks", str(tmp_path / "labelled" / "masks")]) == 2
    assert "bgremoval evaluate: no image in" in capsys.readouterr().err

    # auto scores what `remove` would publish: the model's measured choice
    auto = ["evaluate", "--model", str(run), "--images", str(tmp_path / "labelled" / "images"),
            "--masks", str(tmp_path / "labelled" / "masks"), "--json", str(out_json), "--refine", "auto"]
    assert main(auto) == 0
    assert json.loads(out_json.read_text())["refined"] is True
    assert "edge refinement: on (the model has no measured choice" in capsys.readouterr().out
    save_refine_choice(choose_refinement([0.99], [0.98], "val"), str(run))
    for model in (str(run), str(run / "model.pt")):  # the run folder, or the weights in it
        auto[2] = model
        assert main(auto) == 0
        assert json.loads(out_json.read_text())["refined"] is False
        assert "edge refinement: off (measured for this model on 1 val pairs" in capsys.readouterr().out


def test_calibrate_writes_the_threshold_and_the_refinement_choice_next_to_the_model(tmp_path, capsys,
                                                                                      write_model_folder):
    from tasks.dev.synthetic import write_synthetic_dataset
    from tasks.model.refine_choice import load_refine_choice

    dataset = str(tmp_path / "datasets" / "v1")
    write_synthetic_dataset(dataset, 8, seed=3, max_side=48,
                            split_for=lambda i: "val" if i < 4 else "test" if i < 6 else "train")
    model = write_model_folder(tmp_path / "run")
    assert main(["calibrate", "--model", f"{model}/model.pt", "--dataset", dataset]) == 0  # or the run folder
    out = capsys.readouterr().out
    choice = load_refine_choice(model)
    assert choice is not None and f"edge refinement: {choice.describe()}" in out and "quality threshold" in out
    assert (tmp_path / "run" / "quality.json").exists()
    assert main(["calibrate", "--model", str(tmp_path / "nothing"), "--dataset", dataset]) == 2
    assert main(["calibrate", "--model", model, "--dataset", dataset, "--target-iou", "1.5"]) == 2


def test_train_without_a_dataset_says_so_before_starting_workers(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "nowhere"), "--out", str(out), "--init-from", "scratch"]) == 2
    assert "no manifest at" in capsys.readouterr().err and not out.exists()


def test_train_resumes_a_checkpoint_with_the_start_it_had_and_names_changed_settings_in_one_line(
        tmp_path, capsys, monkeypatch):
    """A run folder holding a checkpoint is resumed: --init-from is not resolved again (a champion
    promoted since would replace the staged start), and a changed setting is one line, not the
    workers' traceback."""
    from types import SimpleNamespace

    import tasks.train.ddp as ddp
    from tasks.dev.synthetic import write_synthetic_dataset
    from tasks.train.config import default_lr
    from tasks.train.loop import _public_config

    monkeypatch.setenv("BGREMOVAL_STATE", str(tmp_path / "no-stack"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dataset, out = tmp_path / "datasets" / "v1", tmp_path / "run"
    write_synthetic_dataset(str(dataset), 4, seed=3, max_side=48, split_for=lambda i: "val" if i < 1 else "train")
    out.mkdir()
    started = TrainConfig(dataset_url=str(dataset), output_url=str(out), epochs=1, lr=default_lr(True), input_size=192,
                          init_from=str(out / "init" / "model.pt"))
    torch.save({"epoch": 1, "model": {}, "config": _public_config(started)}, out / "checkpoint.pt")  # what workers read
    (out / "config.json").write_text(json.dumps({**_public_config(started), "input_size": 320}))  # a stale one: unread

    assert main(["train", "--dataset", str(dataset), "--out", str(out), "--input-size", "320"]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of a run started with other settings (input_size: 192 → 320)" in err
    assert len(err.strip().splitlines()) == 1

    launched = {}
    monkeypatch.setattr(ddp, "launch_local", lambda config, **kw: launched.update(config=config) or SimpleNamespace(
        start_val_iou=0.97, history=[], metrics={"val_iou": 0.98}, model_url=str(out / "model.pt")))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", "datasets/v1", "--out", "run", "--input-size", "192", "--epochs", "3"]) == 0
    assert launched["config"].init_from == str(out / "init" / "model.pt") and launched["config"].epochs == 3
    assert not (out / "init").exists()  # nothing staged again
    printed = capsys.readouterr().out
    assert "resuming the run in run from its checkpoint, to 3 epoch(s)" in printed
    assert "start (the run's starting weights): val IoU 97.00 %" in printed


def test_model_commands_need_a_configured_registry_and_name_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BGREMOVAL_STATE", str(tmp_path / "no-stack"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["model", "list"]) == 2
    assert "no MLflow registry is configured" in capsys.readouterr().err
    assert main(["evaluate", "--model", "models:/bgremoval-u2net@champion", "--images", str(tmp_path),
                 "--masks", str(tmp_path)]) == 2
    assert main(["train", "--dataset", str(tmp_path), "--out", str(tmp_path / "run"), "--init-from", "champion"]) == 2
    assert main(["quantize", "--model", "models:/bgremoval-u2net@champion", "--calibrate", str(tmp_path),
                 "-o", str(tmp_path / "q.onnx")]) == 2
    assert capsys.readouterr().err.count("no MLflow registry is configured") == 3
    assert list(tmp_path.iterdir()) == []  # no mlflow.db left in the working folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # relative: read here, and not here yet
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["model", "list"]) == 2
    assert main(["remove", str(tmp_path), "-o", str(tmp_path / "out"), "--model", "models:/m@champion"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"the MLflow store {elsewhere / 'mlflow.db'} does not exist") == 2, err
    assert list(elsewhere.iterdir()) == []  # reading a registry creates no empty store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "mlflow.db").touch()
    assert main(["model", "promote", "--version", "7"]) == 2
    assert "bgremoval model promote: Model Version (name=bgremoval-u2net, version=7) not found" in capsys.readouterr().err


def test_commands_use_a_stopped_or_running_stacks_store_and_artifact_root(tmp_path, monkeypatch):
    """With no MLFLOW_TRACKING_URI, the command line takes the embedded stack's store and also its
    artifact root: an experiment a command creates there keeps its files where the stack's do."""
    from tasks.cli.environment import mlflow_environment

    state = tmp_path / "state"
    state.mkdir()
    (state / "stack.env").write_text(f"export MLFLOW_TRACKING_URI=sqlite:///{state}/mlflow/mlflow.db\n"
                                     f"export BGREMOVAL_MLFLOW_ARTIFACTS={state}/mlflow/artifacts\n")
    monkeypatch.setenv("BGREMOVAL_STATE", str(state))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BGREMOVAL_MLFLOW_ARTIFACTS", raising=False)
    mlflow_environment()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{state}/mlflow/mlflow.db"
    assert os.environ["BGREMOVAL_MLFLOW_ARTIFACTS"] == f"{state}/mlflow/artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")  # a store of one's own: left alone
    monkeypatch.delenv("BGREMOVAL_MLFLOW_ARTIFACTS")
    mlflow_environment()
    assert "BGREMOVAL_MLFLOW_ARTIFACTS" not in os.environ


def test_a_relative_store_is_made_absolute_where_the_command_starts(tmp_path, monkeypatch):
    """`train` hands the store to workers that run in the project folder: a relative SQLite path
    must name the database in the folder the user ran the command from."""
    from tasks.cli.environment import mlflow_environment
    from tasks.registry import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    mlflow_environment()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert absolute_tracking_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert absolute_tracking_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert absolute_tracking_uri("file:mlruns") == f"file://{tmp_path}/mlruns"
    assert absolute_tracking_uri("mlruns") == f"file://{tmp_path}/mlruns"
    assert absolute_tracking_uri("/srv/mlruns") == "/srv/mlruns"
    assert absolute_tracking_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"
    assert absolute_tracking_uri("databricks") == "databricks"


def test_serve_defaults_to_what_remove_uses_and_says_which(monkeypatch, capsys, tmp_path):
    """`serve` with no --model serves the champion (the alias, so that it follows promotions) or the
    published weights, as `remove` does, and says which."""
    import tasks.serving.engines as engines
    import tasks.serving.http as http

    served = {}
    monkeypatch.setattr(http, "serve", lambda config, host, port: served.update(model=config.model))
    monkeypatch.setattr(engines, "default_model", lambda name: (f"models:/{name}@champion", f"the champion of {name!r}"))
    (tmp_path / "mlflow.db").touch()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["serve", "--registered-model", "shop"]) == 0
    assert served["model"] == "models:/shop@champion"
    assert "no --model given: serving the champion of 'shop'" in capsys.readouterr().err
