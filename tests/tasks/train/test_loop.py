"""Tests for ``tasks.train.loop.train`` in one process: fitting, resuming, MLflow logging,
checkpoints, ``batch_size="auto"`` and the pieces (loss, schedule, precision)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tasks.core import storage
from tasks.model.u2net import U2Net, U2NetOutput, build_model
from tasks.train import loop
from tasks.train.batch_size import training_step_probe
from tasks.train.checkpoint import load_checkpoint, load_state_dict_from_url, state_dict_sha256
from tasks.train.config import TrainConfig
from tasks.train.loop import EpochMetrics, TrainResult, build_scheduler, deep_supervision_loss, resolve_amp, train
from tasks.dev.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.process  # trains, exports or registers real models: tens of seconds

torch.set_num_threads(1)

TINY = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """Eight 64-px products (six train, two val) as a dataset version on local disk."""
    url = str(tmp_path_factory.mktemp("data") / "datasets" / "v1")
    write_synthetic_dataset(url, 8, seed=11, max_side=64, split_for=lambda i: "val" if i in (3, 6) else "train")
    return url


def _config(dataset: str, tmp_path, **changes) -> TrainConfig:
    values = dict(dataset_url=dataset, output_url=str(tmp_path / "run"), model="u2netp", model_widths=TINY,
                  epochs=2, batch_size=3, input_size=64, amp="off", schedule="constant", lr=3e-3,
                  cache_dir=str(tmp_path / "cache"), mlflow_enabled=False, log_system_metrics=False)
    values.update(changes)
    return TrainConfig(**values)


def test_u2netp_overfits_a_tiny_set(tmp_path, capfd) -> None:
    url = str(tmp_path / "four")
    # Shorts, a light-coloured product, a short-sleeved top and long pants, 64 px high.
    write_synthetic_dataset(url, 4, seed=3, max_side=64)
    config = TrainConfig(dataset_url=url, output_url=str(tmp_path / "run"), model="u2netp", epochs=45,
                         batch_size=4, input_size=64, lr=3e-3, schedule="constant", amp="off", val_split="train",
                         cache_dir=str(tmp_path / "cache"), mlflow_enabled=False)
    result = train(config)
    assert result.epochs_run == 45 and result.n_train == result.n_val == 4
    progress = capfd.readouterr().err  # one progress bar per epoch, its rate in images per second
    assert "epoch 1/45" in progress and "epoch 45/45" in progress and "img/s" in progress and "loss=" in progress
    assert result.metrics["val_iou"] >= 0.95, [round(h["val_iou"], 3) for h in result.history]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] / 3


def test_resume_continues_the_same_run_and_matches_an_uninterrupted_one(dataset, tmp_path) -> None:
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    common = dict(mlflow_enabled=True, mlflow_tracking_uri=tracking, mlflow_experiment="resume-test")

    straight = train(_config(dataset, tmp_path, output_url=str(tmp_path / "straight"), epochs=3, **common))
    assert (straight.start_epoch, straight.epochs_run, straight.resumed) == (1, 3, False)

    interrupted = _config(dataset, tmp_path, output_url=str(tmp_path / "resumed"), epochs=1, **common)
    first = train(interrupted)
    assert first.epochs_completed == 1
    second = train(_config(dataset, tmp_path, output_url=str(tmp_path / "resumed"), epochs=3, **common))
    assert (second.start_epoch, second.epochs_run, second.epochs_completed, second.resumed) == (2, 2, 3, True)
    assert second.mlflow_run_id == first.mlflow_run_id
    # Model, optimiser, schedule, sampler epoch and RNG states were restored: bit-identical weights.
    assert second.weights_sha256 == straight.weights_sha256
    assert [h["train_loss"] for h in second.history] == [h["train_loss"] for h in straight.history]

    # Nothing left to do: a third call changes nothing and logs nothing.
    third = train(_config(dataset, tmp_path, output_url=str(tmp_path / "resumed"), epochs=3, **common))
    assert (third.epochs_run, third.start_epoch, third.weights_sha256) == (0, 4, straight.weights_sha256)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # the straight run and the resumed one
    for metric in ("train_loss", "val_loss", "val_iou", "lr"):
        steps = [m.step for m in client.get_metric_history(second.mlflow_run_id, metric)]
        assert sorted(steps) == [1, 2, 3], (metric, steps)
    run = client.get_run(second.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size_per_worker"] == "3" and "storage_options" not in run.data.params
    # params are write-once: the first plan stays there, the extended one is a tag and in config.json
    assert run.data.params["epochs"] == "1" and run.data.tags["epochs_planned"] == "3"
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["epochs"] == 3
    assert run.data.tags["model_url"] == str(tmp_path / "resumed" / "model.pt")
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == Path(dataset).name and inputs[0].dataset.digest
    assert [t.value for t in inputs[0].tags if t.key == "mlflow.data.context"] == ["training"]
    assert not (tmp_path / "mlruns").exists()

    # The files on storage agree with the returned result.
    out = tmp_path / "resumed"
    saved = TrainResult.from_dict(json.loads((out / "result.json").read_text()))
    assert saved.weights_sha256 == third.weights_sha256
    weights = torch.load(out / "model.pt", weights_only=True)
    assert state_dict_sha256(weights) == straight.weights_sha256
    assert (out / "weights-rank0.sha256").read_text().strip() == straight.weights_sha256
    checkpoint = load_checkpoint(str(out / "checkpoint.pt"))
    assert checkpoint["epoch"] == 3 and checkpoint["sampler_epoch"] == 3
    assert checkpoint["mlflow_run_id"] == second.mlflow_run_id
    assert {"optimizer", "scheduler", "rng", "history", "batch_size"} <= set(checkpoint)


def test_resume_refuses_a_checkpoint_from_other_settings(dataset, tmp_path) -> None:
    train(_config(dataset, tmp_path, epochs=1, max_steps_per_epoch=1))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.003 → 0.01\).*new output_url"):
        train(_config(dataset, tmp_path, epochs=2, lr=1e-2))


def test_a_moved_run_folder_resumes_with_its_staged_start(dataset, tmp_path) -> None:
    """The run folder (and the starting weights staged inside it) moved to another place: the checkpoint's
    paths are read in the new folder, so it resumes instead of reporting changed settings."""
    import shutil

    first = tmp_path / "first" / "run"
    init = first / "init" / "model.pt"
    init.parent.mkdir(parents=True)
    torch.save(U2Net(_config(dataset, tmp_path).model_config()).state_dict(), init)
    train(_config(dataset, tmp_path, output_url=str(first), init_from=str(init), epochs=1, max_steps_per_epoch=1))
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(first, moved)
    resumed = train(_config(dataset, tmp_path, output_url=str(moved), init_from=str(moved / "init" / "model.pt"),
                            epochs=2, max_steps_per_epoch=1))
    assert (resumed.start_epoch, resumed.epochs_completed, resumed.resumed) == (2, 2, True)
    with pytest.raises(ValueError, match=r"init_from: '.*/elsewhere/run/init/model.pt' → '/somewhere/else.pt'"):
        train(_config(dataset, tmp_path, output_url=str(moved), init_from="/somewhere/else.pt", epochs=3,
                      max_steps_per_epoch=1))


def test_a_copied_run_folder_goes_on_in_an_mlflow_run_of_its_own(dataset, tmp_path) -> None:
    """A copy of a run folder (its original still there) resumes into a new MLflow run that names the
    original; the original's run is left as it was. A moved folder goes on in its own run (above)."""
    import shutil

    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    common = dict(mlflow_enabled=True, mlflow_tracking_uri=tracking, mlflow_experiment="copies", max_steps_per_epoch=1)
    original = train(_config(dataset, tmp_path, output_url=str(tmp_path / "a"), epochs=1, **common))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = train(_config(dataset, tmp_path, output_url=str(tmp_path / "b"), epochs=2, **common))
    assert copy.resumed and copy.mlflow_run_id != original.mlflow_run_id
    client = MlflowClient(tracking)
    run = client.get_run(copy.mlflow_run_id)
    assert run.data.tags["copied_from_run"] == original.mlflow_run_id and run.data.params["epochs"] == "2"
    assert [m.step for m in client.get_metric_history(original.mlflow_run_id, "val_iou")] == [1]
    assert sorted(m.step for m in client.get_metric_history(copy.mlflow_run_id, "val_iou")) == [1, 2]
    assert (tmp_path / "b" / "mlflow_run_id").read_text().strip() == copy.mlflow_run_id
    # the original folder spelled another way is the same folder, not a copy: it goes on in its own run
    same = train(_config(dataset, tmp_path, output_url=f"file://{tmp_path}/a/", epochs=2, **common))
    assert same.resumed and same.mlflow_run_id == original.mlflow_run_id


def test_auto_batch_size_uses_the_finder_under_a_memory_limit(dataset, tmp_path, monkeypatch) -> None:
    tried: list[int] = []

    def limited_probe(*args, **kwargs):
        real = training_step_probe(*args, **kwargs)

        def step(n: int) -> None:
            tried.append(n)
            if n > 2:
                raise torch.OutOfMemoryError(f"simulated: {n} samples do not fit")
            real(n)

        return step

    monkeypatch.setattr(loop, "training_step_probe", limited_probe)
    result = train(_config(dataset, tmp_path, epochs=1, batch_size="auto", batch_size_start=16))
    assert result.batch_size == 2
    assert tried[0] == 6  # capped at the samples one worker sees per epoch (six train images)
    assert result.history[0]["images"] == 6  # three steps of two


def test_init_from_loads_weights_and_reports_a_missing_file(dataset, tmp_path) -> None:
    source = build_model("u2netp").state_dict()
    payloads = {
        "bare.pt": source,
        "ddp.pt": {f"module.{k}": v for k, v in source.items()},
        "ckpt.pt": {"model": source, "epoch": 4},
    }
    for name, payload in payloads.items():
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        storage.write_bytes(str(tmp_path / name), buffer.getvalue())
        loaded = load_state_dict_from_url(str(tmp_path / name))
        assert state_dict_sha256(loaded) == state_dict_sha256(source)
    with pytest.raises(FileNotFoundError, match="init_from: no file"):
        train(_config(dataset, tmp_path, init_from=str(tmp_path / "missing.pt")))


def test_deep_supervision_loss_sums_seven_bce_terms() -> None:
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    fused, *sides = [torch.randn(2, 1, 8, 8) for _ in range(7)]
    output = U2NetOutput(fused=fused, sides=tuple(sides))
    terms = [F.binary_cross_entropy_with_logits(t, target) for t in output.all()]
    assert deep_supervision_loss(output, target).item() == pytest.approx(sum(terms).item(), rel=1e-6)
    weighted = deep_supervision_loss(output, target, fused_weight=2.0).item()
    assert weighted == pytest.approx(sum(terms).item() + terms[0].item(), rel=1e-6)


def _learning_rates(config: TrainConfig, steps_per_epoch: int) -> tuple[list[float], float]:
    """The learning rate of every step of ``config``'s schedule, and the one after the last step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(config.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]["lr"]


def test_cosine_schedule_warms_up_then_decays_per_iteration() -> None:
    config = TrainConfig(dataset_url="d", output_url="o", epochs=4, lr=1.0, warmup_epochs=1, min_lr_ratio=0.1)
    lrs, last = _learning_rates(config, 10)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then monotone decay
    assert last == pytest.approx(0.1)  # ends at min_lr_ratio · lr
    short = TrainConfig(dataset_url="d", output_url="o", epochs=1, lr=1.0, warmup_epochs=1, min_lr_ratio=0.1)
    lrs, _ = _learning_rates(short, 10)
    # a one-epoch fine-tune warms up over 3 of its 10 steps (MAX_WARMUP_SHARE), not all of them, then decays
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    onecycle = build_scheduler(optimizer, TrainConfig(dataset_url="d", output_url="o", schedule="onecycle"), 5)
    assert isinstance(onecycle, torch.optim.lr_scheduler.OneCycleLR) and onecycle.total_steps == 50


def test_a_finished_run_resumed_with_more_epochs_warms_up_again_instead_of_jumping() -> None:
    """A one-epoch fine-tune ends at the floor; resumed to five epochs, its rate climbs back to lr
    over a warm-up and decays to the floor at the new end, with no step larger than the warm-up's."""
    from tasks.train.loop import resumed_phase

    short = TrainConfig(dataset_url="d", output_url="o", epochs=1, lr=1.0, warmup_epochs=1, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, short, steps_per_epoch=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    checkpoint = {"config": short.to_dict(), "scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}
    stopped_at = optimizer.param_groups[0]["lr"]
    assert stopped_at == pytest.approx(0.1)

    longer = TrainConfig(dataset_url="d", output_url="o", epochs=5, lr=1.0, warmup_epochs=1, min_lr_ratio=0.1)
    phase = resumed_phase(checkpoint, longer)
    assert phase == (10, pytest.approx(0.1))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = build_scheduler(optimizer, longer, 10, phase)
    optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        resumed.step()
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(stopped_at) and max(lrs) == pytest.approx(1.0) and peak == 10
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # the warm-up: 10 steps, 0.09 each
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then the decay
    assert max(abs(a - b) for a, b in zip(lrs, lrs[1:])) < 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the floor at the new end
    # resumed again at five epochs (interrupted during the extension), the same phase goes on
    assert resumed_phase({**checkpoint, "config": longer.to_dict(), "lr_phase": list(phase)}, longer) == phase
    assert resumed_phase({**checkpoint, "config": longer.to_dict()}, longer) is None  # an interrupted run: as planned
    assert resumed_phase(checkpoint, TrainConfig(dataset_url="d", output_url="o", epochs=5, schedule="constant")) is None


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) == (None, False)
    assert resolve_amp("bf16", cpu) == (torch.bfloat16, False)
    assert resolve_amp("auto", cpu) == ((torch.bfloat16, False) if loop.cpu_supports_bf16() else (None, False))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("fp16", cpu)
    if torch.cuda.is_available():
        assert resolve_amp("auto", torch.device("cuda", 0)) == (torch.float16, True)


def test_tensorboard_event_files_hold_the_epoch_metrics(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(dataset_url="d", output_url=str(tmp_path / "out"), mlflow_enabled=False)
    tracker = loop._Tracker(config, enabled=True, run_id_url=str(tmp_path / "out" / "mlflow_run_id"))
    tracker.start(None)
    tracker.log_epoch(EpochMetrics(epoch=1, train_loss=2.0, val_loss=1.5, val_iou=0.5, lr=0.1, images=8, seconds=2.0))
    tracker.log_epoch(EpochMetrics(epoch=2, train_loss=1.0, val_loss=1.0, val_iou=0.75, lr=0.05, images=8, seconds=2.0))
    tracker.finish("FINISHED")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_iou")] == [(1, 0.5), (2, 0.75)]
    assert [e.value for e in events.Scalars("train_images_per_s")] == [4.0, 4.0]


def test_time_spent_waiting_for_the_data_loader_is_measured_per_epoch(dataset, tmp_path, monkeypatch) -> None:
    import time

    from tasks.train.data import SegmentationDataset

    real = SegmentationDataset.__getitem__

    def slow(self, index):  # a loader that cannot keep up: 0.15 s per image, read in the training process
        time.sleep(0.15)
        return real(self, index)

    monkeypatch.setattr(SegmentationDataset, "__getitem__", slow)
    result = train(_config(dataset, tmp_path, epochs=1, num_workers=0))
    (epoch,) = result.history
    assert epoch["data_wait_s"] >= 6 * 0.15 * 0.9  # six training images waited for, one by one
    assert EpochMetrics(**epoch).data_wait_share > 0.3
    assert "data_wait_share" in EpochMetrics(**epoch).mlflow_metrics()
