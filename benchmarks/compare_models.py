"""Two models on the same real test photos: is the second better, beyond the noise of the photos?

Scores ``--first`` and ``--second`` (a training run folder, or ``pretrained`` for the published
U2-NetP) on ``quality_real.py``'s test split (``--split val`` to choose between variants; the same
dataset version under ``--work``, the same rows and audit flags; ``../shared/data`` needed), photo
by photo and interleaved so that both share the machine's load, at ``--size`` px with the plain
maps (no refinement, no flip). Prints the seed's columns for each model, then the per-photo
difference of IoU (mean ± one standard error, and how many photos each scores higher), with the
machine load. Differences between two training runs also carry the runs' own noise (the seed of
each), which one comparison cannot measure.

    .venv/bin/python benchmarks/compare_models.py --work /tmp/qr --first /tmp/qr/runs/A --second /tmp/qr/runs/B
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    import quality_real
    from input_size import _torch_model, predictor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    quality_real.add_split_arguments(parser)
    parser.add_argument("--first", required=True, help="'pretrained' or a training run folder")
    parser.add_argument("--second", required=True, help="'pretrained' or a training run folder")
    parser.add_argument("--size", type=int, default=320, help="network input size")
    args = parser.parse_args(argv)
    rows = quality_real.split_rows(args)
    if rows is None:
        return 2

    labels = {"first": Path(args.first).name, "second": Path(args.second).name}
    if labels["first"] == labels["second"]:
        labels = {"first": "first", "second": "second"}
    predictors = {}
    for key, label in labels.items():
        model, resize = _torch_model(getattr(args, key))
        predictors[label] = predictor(model, args.size, resize)
    table, seconds, load_start, load_end = quality_real.score_interleaved(rows, predictors)
    print(f"\n{labels['first']} = {args.first}, {labels['second']} = {args.second}; {args.size} px, plain maps; "
          f"load {load_start[0]:.2f} at start, {load_end[0]:.2f} at end, {os.cpu_count()} CPUs\n")
    table.print(f"{args.split} rows: model", "CPU ms/photo", lambda label: seconds[label] / len(rows) * 1000)
    print()
    table.print_paired(labels["first"], labels["second"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
