"""CPU time of the deep-supervision loss of one training step, beside the step itself.

The seven logit maps of U2-NetP (untrained, fixed seed) on a batch of ``--batch`` synthetic images
at ``--size`` px, one thread (as each torchrun worker on a 2-core machine), fp32: the loss and its
backward for each name of ``tasks.train.config.LOSSES``, and ``wbce+wiou`` with its outline weights
pooled over the square directly (the first implementation's cost, computed once a step), interleaved
over ``--rounds`` rounds; then one forward and backward of the model. Prints the median CPU ms of
each row and the machine load.

    .venv/bin/python benchmarks/loss_cost.py [--batch 8] [--size 320] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _direct_weights(target, gain: float = 5.0):
    """The outline weights with the square's mean pooled in one pass (31 px: the size at 320 px)."""
    import torch.nn.functional as F

    return 1 + gain * (F.avg_pool2d(target, 31, 1, 15, count_include_pad=False) - target).abs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from tasks.model.u2net import build_model
    from tasks.train import losses
    from tasks.train.config import LOSSES
    from tasks.train.loop import deep_supervision_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("u2netp").train()
    images = torch.rand(args.batch, 3, args.size, args.size)
    blobs = F.avg_pool2d(torch.rand(args.batch, 1, args.size, args.size), 41, 1, 20)
    masks = (blobs > blobs.mean()).float()
    output = model(images)
    maps = type(output)(output.fused.detach(), tuple(side.detach() for side in output.sides))

    def loss_ms(name: str, weights=None) -> float:
        inputs = type(maps)(maps.fused.clone().requires_grad_(), tuple(s.clone().requires_grad_() for s in maps.sides))
        kept = losses.boundary_weights
        if weights is not None:
            losses.boundary_weights = weights
        try:
            started = time.process_time()
            deep_supervision_loss(inputs, masks, 1.0, name).backward()
            return (time.process_time() - started) * 1000
        finally:
            losses.boundary_weights = kept

    def step_ms() -> float:
        started = time.process_time()
        deep_supervision_loss(model(images), masks, 1.0, "bce").backward()
        return (time.process_time() - started) * 1000

    rows: dict[str, list[float]] = {name: [] for name in LOSSES}
    rows["wbce+wiou, the square pooled directly"] = []
    rows["model forward + backward (bce)"] = []
    load_start = os.getloadavg()
    for _ in range(args.rounds):
        for name in LOSSES:
            rows[name].append(loss_ms(name))
        rows["wbce+wiou, the square pooled directly"].append(loss_ms("wbce+wiou", _direct_weights))
        rows["model forward + backward (bce)"].append(step_ms())
    load_end = os.getloadavg()
    print(f"\nloss of one step: U2-NetP's 7 maps, batch {args.batch}, {args.size} px, 1 thread, fp32; median of "
          f"{args.rounds} interleaved rounds; load {load_start[0]:.2f} at start, {load_end[0]:.2f} at end, "
          f"{os.cpu_count()} CPUs\n")
    print("| row | CPU ms |")
    print("|---|---|")
    for label, values in rows.items():
        print(f"| {label} | {sorted(values)[len(values) // 2]:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
