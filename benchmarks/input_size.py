"""Does a larger network input than the training's 320 px help on real photos?

U2-Net is fully convolutional, so a model trained at 320 px also runs at 384, 448 or 512 px, closer
to the people photos' own 512 px height. This script scores one model at every ``--sizes`` on
``quality_real.py``'s test split (``--split val`` to choose; the same dataset version under ``--work``,
the same rows and audit flags; ``../shared/data`` needed), the sizes interleaved photo by photo so that they share the
machine's load, and prints mean IoU, ≥ 95/97/99 %, boundary F and the CPU milliseconds of one
prediction (the process's CPU time: all threads), with the machine load.

    .venv/bin/python benchmarks/input_size.py --work /tmp/qr                            # the published U2-NetP
    .venv/bin/python benchmarks/input_size.py --work /tmp/qr --model /tmp/qr/runs/NAME --sizes 320 384
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))


def _torch_model(model: str):
    """The model as a torch module (any input size): the published weights converted, or a run's ``model.pt``."""
    if model == "pretrained":
        from tasks.model.pretrained import load_pretrained_model

        return load_pretrained_model().eval(), "stretch"
    if model.lower().endswith(".onnx"):
        raise SystemExit("an ONNX file may fix its input size: name 'pretrained' or a training run folder")
    from tasks.evaluation.scoring import load_model

    module, meta = load_model(model)
    return module.eval(), meta["resize"]


def predictor(model, size: int, resize: str):
    """``predict(image, (width, height))``: the model's probability map of a photo at ``size`` px."""
    from tasks.evaluation.scoring import predict_probabilities

    return lambda image, output_size: predict_probabilities(model, image, size, resize, output_size)


def main(argv: list[str] | None = None) -> int:
    import quality_real

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    quality_real.add_split_arguments(parser)
    parser.add_argument("--model", default="pretrained",
                        help="'pretrained' (the published U2-NetP, zero-shot) or a training run folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 384, 448, 512], help="network input sizes")
    parser.add_argument("--clusters", nargs="+", help="score only these rows of the split (tops, people)")
    args = parser.parse_args(argv)
    rows = quality_real.split_rows(args)
    if rows is None:
        return 2
    rows = [r for r in rows if not args.clusters or r.cluster in args.clusters]

    model, resize = _torch_model(args.model)
    predictors = {f"{size} px": predictor(model, size, resize) for size in args.sizes}
    table, seconds, load_start, load_end = quality_real.score_interleaved(rows, predictors)
    print(f"\ninput size, {args.model} ({resize}); load {load_start[0]:.2f} at start, {load_end[0]:.2f} at end, "
          f"{os.cpu_count()} CPUs")
    table.print(f"{args.split} rows, input", "CPU ms/photo", lambda label: seconds[label] / len(rows) * 1000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
