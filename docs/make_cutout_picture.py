"""Draw ``docs/cutouts.png``, the README's first picture: generated catalogue photos (never the
real photos of ``../shared/data``), their cut-outs by the published U2-NetP over a checkerboard, and
the same product on a colour, as ``bgremoval remove`` writes them.

    .venv/bin/python docs/make_cutout_picture.py [--n 4] [--out docs/cutouts.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

TILE = 260
TITLES = ("photo", "bgremoval remove: cut-out", "on a colour (--background)")


def _fit(image: np.ndarray) -> np.ndarray:
    """``image`` scaled to TILE px high, centred on a TILE-wide white tile."""
    h, w = image.shape[:2]
    scale = TILE / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tile = np.full((TILE, TILE, 3), 255, np.uint8)
    y, x = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
    tile[y:y + small.shape[0], x:x + small.shape[1]] = small
    return tile


def _checkerboard(h: int, w: int, square: int = 12) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    light = ((ys // square + xs // square) % 2 == 0)[..., None]
    return np.where(light, 236, 204).astype(np.uint8).repeat(3, axis=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).with_name("cutouts.png")))
    args = parser.parse_args(argv)
    from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
    from tasks.serving.engines import load_engine
    from tasks.serving.pipeline import InferenceConfig, cut_out_bytes

    engine = load_engine("pretrained")
    config = InferenceConfig(background="#e9dfd0", decontaminate=True)
    rows = []
    for i in range(args.n):
        photo = render_item(i * 7 + 3, SynthConfig(n=64, seed=11, max_side=800)).image
        result = cut_out_bytes(encode_jpeg(photo), engine, config)
        if not result.ok:
            raise SystemExit(f"cannot cut out product {i}: {result.error}")
        rgba = cv2.imdecode(np.frombuffer(result.cutout_png, np.uint8), cv2.IMREAD_UNCHANGED)
        alpha = rgba[..., 3:].astype(np.float32) / 255
        board = _checkerboard(*rgba.shape[:2])
        over = (rgba[..., :3].astype(np.float32) * alpha + board * (1 - alpha)).astype(np.uint8)
        jpeg = cv2.imdecode(np.frombuffer(result.composite_jpeg, np.uint8), cv2.IMREAD_COLOR)
        rows.append(np.hstack([_fit(cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)), _fit(over), _fit(jpeg)]))
    header = np.full((34, TILE * 3, 3), 255, np.uint8)
    for k, title in enumerate(TITLES):
        cv2.putText(header, title, (k * TILE + 8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (40, 40, 40), 1, cv2.LINE_AA)
    picture = np.vstack([header, *rows])
    cv2.imwrite(args.out, picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]}), model: {engine.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
