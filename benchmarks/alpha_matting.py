"""Does alpha matting (rembg's ``-a``) improve the published U2-NetP's cut-outs on real photos?

rembg's alpha matting turns the model's mask into a trimap (sure foreground where the probability
is above ``--fg``, sure background below ``--bg``, both eroded by ``--erode`` px; unknown between)
and solves for alpha in the unknown band with pymatting's closed-form matting. This script does
the same on the test side of ``../shared/data`` (hash of the stem >= 0.9, seed 0, ``--n`` photos per
set) and scores, beside the plain model, with the project's metrics against the ground-truth masks:
mean IoU (alpha >= 0.5), MAE of the alpha, boundary F, and the seconds per photo.

pymatting is not a project dependency (rembg pulls it in: ``.venv/bin/pip install rembg==2.0.86``);
without it the script says so and stops.

    .venv/bin/python benchmarks/alpha_matting.py [--n 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("viton-garments", "ccp-people")


def trimap(prob: np.ndarray, fg: float, bg: float, erode: int) -> np.ndarray:
    """rembg's trimap from a probability map: 1 sure foreground, 0 sure background, 0.5 unknown."""
    kernel = np.ones((3, 3), np.uint8)
    sure_fg = cv2.erode((prob >= fg).astype(np.uint8), kernel, iterations=erode).astype(bool)
    sure_bg = cv2.erode((prob <= bg).astype(np.uint8), kernel, iterations=erode).astype(bool)
    out = np.full(prob.shape, 0.5)
    out[sure_fg], out[sure_bg] = 1.0, 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40, help="test photos per set")
    parser.add_argument("--fg", type=float, default=240 / 255, help="sure-foreground probability (rembg: 240)")
    parser.add_argument("--bg", type=float, default=10 / 255, help="sure-background probability (rembg: 10)")
    parser.add_argument("--erode", type=int, default=10, help="trimap erosion in px (rembg: 10)")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} not present: nothing to measure")
        return 0
    try:
        from pymatting import estimate_alpha_cf
    except ImportError:
        print("pymatting is not installed (.venv/bin/pip install rembg==2.0.86 brings it)")
        return 0
    from tasks.data.splits import stem_uniform
    from tasks.evaluation.metrics import boundary_f, iou, mae
    from tasks.serving.engines import load_engine, probability_map

    engine = load_engine("pretrained")
    print(f"{engine.describe()}; {len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.2f}")
    print(f"\n{'set':<16} {'method':<14} {'n':>3} {'mean IoU':>9} {'MAE':>7} {'boundary F':>11} {'s/photo':>8}")
    for set_name in SETS:
        folder = DATA / set_name
        stems = [p.stem for p in sorted((folder / "images").glob("*.jpg")) if stem_uniform(p.stem, 0) >= 0.9][: args.n]
        rows: dict[str, list[tuple[float, float, float, float]]] = {"model": [], "alpha matting": []}
        for stem in stems:
            rgb = cv2.cvtColor(cv2.imread(str(folder / "images" / f"{stem}.jpg")), cv2.COLOR_BGR2RGB)
            truth = cv2.imread(str(folder / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) > 127
            start = time.perf_counter()
            prob = probability_map(engine, rgb)
            model_s = time.perf_counter() - start
            rows["model"].append((iou(prob >= 0.5, truth), mae(prob, truth), boundary_f(prob >= 0.5, truth), model_s))
            start = time.perf_counter()
            alpha = np.clip(estimate_alpha_cf(rgb / 255.0, trimap(prob, args.fg, args.bg, args.erode)), 0, 1)
            matting_s = model_s + time.perf_counter() - start
            rows["alpha matting"].append((iou(alpha >= 0.5, truth), mae(alpha.astype(np.float32), truth),
                                          boundary_f(alpha >= 0.5, truth), matting_s))
        for method, values in rows.items():
            v = np.asarray(values)
            print(f"{set_name:<16} {method:<14} {len(v):>3} {v[:, 0].mean():>8.3%} {v[:, 1].mean():>7.4f} "
                  f"{v[:, 2].mean():>10.3%} {v[:, 3].mean():>8.2f}")
    print(f"load at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
