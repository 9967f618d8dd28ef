"""Does edge refinement (a guided filter on the photo) improve cut-outs on real photos?

:func:`tasks.model.refine.refine_probability` pulls the probability map, resized to the photo, onto
the photo's own edges. This script measures it on ``quality_real.py``'s test split (``--split val`` to
choose; the same dataset version under ``--work``, the same rows, the same audit flags; ``../shared/data`` needed): for each
photo the model's map is computed once, then scored plain and refined with every ``--radius`` ×
``--eps``, by the project's metrics (IoU of the map at 0.5, boundary F) against the photo's own mask.
The refinement's own time per photo is printed beside each row, and the machine load with the table.

    .venv/bin/python benchmarks/edge_refinement.py --work /tmp/qr                      # the published U2-NetP
    .venv/bin/python benchmarks/edge_refinement.py --work /tmp/qr --model /tmp/qr/runs/NAME --flip
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import cv2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import quality_real

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    quality_real.add_split_arguments(parser)
    parser.add_argument("--model", default="pretrained",
                        help="'pretrained' (the published U2-NetP, zero-shot), an ONNX file or a training run folder")
    parser.add_argument("--flip", action="store_true",
                        help="test-time flip before refining, as `bgremoval remove --flip` runs it (mean of the logits)")
    parser.add_argument("--radius", type=float, nargs="+", default=[1, 2, 3, 4], help="radii in network pixels")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-2], help="regularisations")
    args = parser.parse_args(argv)
    rows = quality_real.split_rows(args)
    if rows is None:
        return 2

    from tasks.evaluation.scoring import predict_probabilities
    from tasks.model.published import require_pretrained_onnx
    from tasks.model.refine import RefineConfig, refine_probability

    model_url = str(require_pretrained_onnx()) if args.model == "pretrained" else args.model
    model, meta = quality_real.scoring_model(model_url, args.flip)
    input_size = int(meta["input_size"])
    configs = {"plain": None} | {f"refined r{r:g} eps {e:g}": RefineConfig(r, e) for r, e in product(args.radius, args.eps)}
    table = quality_real.VariantTable()
    seconds = dict.fromkeys(configs, 0.0)
    load_start = os.getloadavg()
    for row, (_, _, image, mask) in zip(rows, quality_real._pairs(rows)):
        height, width = mask.shape[:2]
        prob = predict_probabilities(model, image, input_size, meta["resize"], (width, height))
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        truth = mask >= 128
        for name, config in configs.items():
            started = time.perf_counter()
            out = prob if config is None else refine_probability(prob, image, input_size, config)
            seconds[name] += time.perf_counter() - started
            table.add(row, name, out >= 0.5, truth)
    load_end = os.getloadavg()
    print(f"\nedge refinement, {model_url} at {input_size} px{' + test-time flip' if args.flip else ''}; "
          f"load {load_start[0]:.2f} at start, {load_end[0]:.2f} at end, {os.cpu_count()} CPUs")
    table.print(f"{args.split} rows, method", "refine ms/photo",
                lambda name: None if configs[name] is None else seconds[name] / len(rows) * 1000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
