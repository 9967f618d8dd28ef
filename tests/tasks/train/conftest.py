"""Fixtures shared by the multi-worker training tests (DDP, Horovod): a tiny model and data set,
the validation IoU of a saved model recomputed in the test process, and the checks every
two-worker run of the tiny configuration must pass."""

from __future__ import annotations

import pytest
import torch

from tasks.model.u2net import U2Net
from tasks.train.checkpoint import state_dict_sha256
from tasks.train.config import TrainConfig
from tasks.train.data import SegmentationDataset, prepare_split
from tasks.dev.synthetic import write_synthetic_dataset

#: Channel widths of a tiny U2-Net: the real architecture, a run takes seconds.
TINY_WIDTHS = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}


@pytest.fixture(scope="module")
def two_split_dataset(tmp_path_factory) -> str:
    """Ten 64-px products: eight train, two val; yields the dataset URL."""
    url = str(tmp_path_factory.mktemp("data") / "datasets" / "v1")
    write_synthetic_dataset(url, 10, seed=21, max_side=64, split_for=lambda i: "val" if i in (2, 7) else "train")
    return url


@pytest.fixture()
def val_iou_of():
    """``val_iou_of(model_path, dataset_url, cache_dir)``: mean per-image IoU of a saved tiny model
    on the whole val split at 64 px, computed in this process."""

    def compute(model_path, dataset: str, cache: str) -> float:
        config = TrainConfig(dataset_url=dataset, output_url="unused", model_widths=TINY_WIDTHS)
        model = U2Net(config.model_config())
        model.load_state_dict(torch.load(model_path, weights_only=True))
        model.eval()
        ious = []
        for image, mask in SegmentationDataset(prepare_split(dataset, "val", cache), 64):
            with torch.no_grad():
                predicted = model(image[None]).fused[0] > 0
            truth = mask > 0.5
            union = (predicted | truth).sum().item()
            ious.append((predicted & truth).sum().item() / union if union else 1.0)
        return sum(ious) / len(ious)

    return compute


@pytest.fixture()
def tiny_config(two_split_dataset, tmp_path):
    """``tiny_config(experiment, **changes)``: a 2-epoch TrainConfig of the tiny model on the
    two-split data set, writing to ``tmp_path/run`` and an SQLite MLflow store in ``tmp_path``."""

    def build(experiment: str, **changes) -> TrainConfig:
        values = dict(dataset_url=two_split_dataset, output_url=str(tmp_path / "run"), model="u2netp",
                      model_widths=TINY_WIDTHS, epochs=2, batch_size=2, input_size=64, lr=3e-3,
                      cache_dir=str(tmp_path / "cache"), mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      mlflow_experiment=experiment)
        values.update(changes)
        return TrainConfig(**values)

    return build


@pytest.fixture()
def check_two_worker_run(two_split_dataset, val_iou_of, tmp_path):
    """``check_two_worker_run(result, experiment)``: the checks every two-worker run of
    :func:`tiny_config` passes, whatever launched it: both workers ended with the weights saved in
    ``model.pt``, each epoch saw the eight train samples (4 + 4, two steps of two per worker), and
    MLflow holds one finished run whose val IoU (logged once an epoch, averaged over both workers'
    val images) is the saved model's, recomputed here."""

    def check(result, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        assert (result.world_size, result.epochs_run, result.start_epoch) == (2, 2, 1)
        hashes = [(tmp_path / "run" / f"weights-rank{r}.sha256").read_text().strip() for r in range(2)]
        assert hashes[0] == hashes[1] == result.weights_sha256
        assert state_dict_sha256(torch.load(tmp_path / "run" / "model.pt", weights_only=True)) == hashes[0]
        assert [h["images"] for h in result.history] == [8, 8]

        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
        assert runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
        history = client.get_metric_history(result.mlflow_run_id, "val_iou")
        assert sorted(m.step for m in history) == [1, 2]
        for metric in ("train_loss", "val_loss", "lr"):
            assert len(client.get_metric_history(result.mlflow_run_id, metric)) == 2
        logged = {m.step: m.value for m in history}
        assert logged[2] == pytest.approx(result.metrics["val_iou"])
        expected = val_iou_of(tmp_path / "run" / "model.pt", two_split_dataset, str(tmp_path / "cache"))
        assert logged[2] == pytest.approx(expected, abs=1e-6)

    return check
