"""Fine-tuning from the published U2-NetP weights: the smoke test of the recipe, and the losses.

The published file is what the install step fetched; without it the smoke test skips, except
under ``CI=true``.
"""

from __future__ import annotations


import pytest
import torch

from tasks.model.pretrained import write_pretrained_folder
from tasks.train.config import TrainConfig
from tasks.train.loop import train
from tasks.train.losses import LOSSES, boundary_weights, segmentation_loss, segmentation_losses, soft_iou_loss, ssim_loss
from tasks.dev.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.process  # trains, exports or registers real models: tens of seconds


def test_losses_are_zero_for_a_perfect_prediction_and_grow_with_errors():
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:24, 8:24] = 1
    perfect = (target * 2 - 1) * 30
    wrong = -perfect
    assert float(soft_iou_loss(perfect, target)) < 1e-3 and float(soft_iou_loss(wrong, target)) > 0.95
    assert float(ssim_loss(perfect, target)) < 1e-3 and float(ssim_loss(wrong, target)) > 0.5
    for name in LOSSES:
        assert float(segmentation_loss(perfect, target, name)) < 1e-3
        assert float(segmentation_loss(wrong, target, name)) > float(segmentation_loss(torch.zeros_like(target), target, name))
    with pytest.raises(ValueError, match="loss must be one of"):
        segmentation_loss(perfect, target, "dice")
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(dataset_url="d", output_url="o", loss="focal")


def test_the_structure_loss_counts_an_error_on_the_outline_more_than_one_inside():
    target = torch.zeros(1, 1, 64, 64)
    target[:, :, 16:48, 16:48] = 1
    perfect = (target * 2 - 1) * 10
    on_outline, inside = perfect.clone(), perfect.clone()
    on_outline[:, :, 16:20, 30:34] *= -1
    inside[:, :, 30:34, 30:34] *= -1
    assert torch.isclose(segmentation_loss(on_outline, target, "bce"), segmentation_loss(inside, target, "bce"))
    assert float(segmentation_loss(on_outline, target, "wbce+wiou")) > 1.5 * float(segmentation_loss(inside, target, "wbce+wiou"))
    weights = boundary_weights(target)
    assert float(weights[0, 0, 0, 0]) == 1.0 and float(weights[0, 0, 16, 32]) > 3.0
    # deep supervision computes the weights once for the seven maps: the same losses as map by map
    maps = [on_outline, inside, perfect]
    for name in LOSSES:
        together = segmentation_losses(maps, target, name)
        assert all(torch.isclose(a, segmentation_loss(m, target, name)) for a, m in zip(together, maps)), name


def test_fine_tuning_starts_from_the_published_weights(tmp_path, published):
    """Two short epochs at 96 px: from the published weights the first validation is already
    good (random weights give a blob), and fine-tuning keeps it so."""
    url = str(tmp_path / "data")
    write_synthetic_dataset(url, 12, seed=5, max_side=128, split_for=lambda i: "val" if i % 4 == 0 else "train")
    common = dict(dataset_url=url, model="u2netp", epochs=2, batch_size=3, input_size=96, lr=3e-4, amp="off",
                  warmup_epochs=0.0, loss="bce+iou", cache_dir=str(tmp_path / "cache"), mlflow_enabled=False,
                  log_system_metrics=False, tensorboard=False)
    init = write_pretrained_folder(str(tmp_path / "init"))
    tuned = train(TrainConfig(output_url=str(tmp_path / "tuned"), init_from=init, **common))
    scratch = train(TrainConfig(output_url=str(tmp_path / "scratch"), **common))
    first = [h["val_iou"] for h in tuned.history]
    assert first[0] > 0.8 and first[-1] > 0.8, first
    assert first[0] > scratch.history[0]["val_iou"] + 0.2, (first, [h["val_iou"] for h in scratch.history])
    # the starting weights' own val IoU is measured before any step (what the fine-tune must beat; at
    # 96 px, far from the 320 px they were trained at, they start lower); from scratch there is nothing
    assert tuned.start_val_iou is not None and 0.0 < tuned.start_val_iou < first[-1] and scratch.start_val_iou is None
