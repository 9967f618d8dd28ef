"""Where the time of one cut-out goes: each stage of ``bgremoval remove`` timed on its own.

The stages are the ones :func:`tasks.serving.pipeline.iter_remove_backgrounds` runs for every
photo, called one after the other on one photo at a time (batch 1, no overlap between stages):

* ``read``: the JPEG's bytes from disk;
* ``decode``: :func:`tasks.core.codecs.decode_image` (full resolution, EXIF orientation applied);
* ``preprocess``: :func:`tasks.model.preprocess.prepare_input` (resize to the model's input, normalise);
* ``model``: the engine's ``predict`` on the 1×3×S×S input (ONNX Runtime, ``--threads`` intra-op threads);
* ``quality``: :func:`tasks.serving.engines.unletterboxed` and :func:`tasks.serving.quality.quality_score`;
* ``map at photo``: :func:`tasks.model.refine.map_at_photo`, the probability map at the photo's size and
  refined on its edges (the default :class:`tasks.model.refine.RefineConfig`, as ``bgremoval remove`` runs);
* ``encode``: the pipeline's rendering of the RGBA PNG cut-out and the JPEG on white;
* ``write``: both files to disk.

Beside them, in the same run and on the same photos, the two cheaper decodes the inference issue
names, so that their saving is measured and not guessed: Pillow's ``draft`` (libjpeg's DCT scaling:
the JPEG decoded at 1/2, 1/4 or 1/8 of its size, the smallest that stays at least twice the model's
input) and OpenCV's ``imdecode`` (no EXIF); and the cut-out's PNG alone, as the pipeline writes it
(:func:`tasks.core.png.png_bytes`: ISA-L's deflate) and as OpenCV's libpng on zlib wrote it before
(level 1, the "up" filter), on the same RGBA pixels.

Every stage runs ``--repeat`` rounds over all photos; the table keeps each stage's median per
photo. "share" is the stage's part of the sum of the pipeline's stages (the alternatives are not
in the sum). The model is the published U2-NetP (``u2netp.onnx``, the file rembg runs) when it is
on this machine, else an untrained export of the same architecture (speed does not depend on the
weights). The process keeps freed memory in its heap, as ``bgremoval remove`` does
(:func:`tasks.core.heap.keep_freed_memory`).

Run from the project root:

    .venv/bin/python benchmarks/inference_profile.py                  # 16 photos 1000x1333, 2 rounds
    .venv/bin/python benchmarks/inference_profile.py --threads 1 --n 8
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

STAGES = ("read", "decode", "preprocess", "model", "quality", "map at photo", "encode", "write")
#: Each alternative, timed on the same photos, and the stage it is read against.
ALTERNATIVES = {"alt: decode with draft": "decode", "alt: cv2.imdecode": "decode",
                "alt: cut-out PNG, ISA-L": "encode", "alt: cut-out PNG, OpenCV": "encode"}


def _model_path(tmp: Path, size: int) -> tuple[str, str]:
    """The published ``u2netp.onnx`` when present, else an untrained U2-NetP export."""
    from tasks.model.published import find_pretrained_onnx

    found = find_pretrained_onnx()
    if found is not None:
        return str(found), f"published u2netp.onnx ({found})"
    from inference_throughput import export_model

    return export_model("u2netp", size, tmp / "model"), "untrained U2-NetP export"


def _draft_decode(data: bytes, input_size: int) -> np.ndarray:
    """Decode a JPEG at the smallest DCT scale that keeps both sides at least twice ``input_size``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (2 * input_size, 2 * input_size))
        return np.asarray(image.convert("RGB"))


def profile(paths: list[str], engine, out: Path, repeat: int) -> dict[str, list[float]]:
    """Time every stage (and the alternative decodes) on every photo, ``repeat`` rounds; returns
    ``{stage: [seconds per photo and round]}``."""
    from tasks.core.codecs import decode_image, encode
    from tasks.core.png import png_bytes
    from tasks.model.preprocess import prepare_input
    from tasks.model.refine import RefineConfig, map_at_photo
    from tasks.serving.engines import unletterboxed
    from tasks.serving.pipeline import InferenceConfig, _render
    from tasks.serving.quality import quality_score

    config = InferenceConfig(batch_size=1)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        for path in paths:
            clock = time.perf_counter
            t = clock()
            data = Path(path).read_bytes()
            times["read"].append(clock() - t)
            t = clock()
            rgb = decode_image(data)
            times["decode"].append(clock() - t)
            t = clock()
            tensor = prepare_input(rgb, engine.input_size, engine.resize, engine.mean, engine.std)
            times["preprocess"].append(clock() - t)
            t = clock()
            probs, sides = engine.predict(tensor[None])
            times["model"].append(clock() - t)
            height, width = rgb.shape[:2]
            t = clock()
            prob_s, side_s = unletterboxed(probs[0], None if sides is None else sides[0], engine, height, width)
            quality_score(prob_s, side_s, config.quality)
            times["quality"].append(clock() - t)
            t = clock()
            prob = map_at_photo(np.ascontiguousarray(prob_s, dtype=np.float32), rgb, engine.input_size, RefineConfig())
            times["map at photo"].append(clock() - t)
            t = clock()
            outputs = _render(rgb, prob, config)  # the pipeline's own rendering of the two files
            times["encode"].append(clock() - t)
            t = clock()
            (out / (Path(path).stem + ".png")).write_bytes(outputs["cutout_png"])
            (out / (Path(path).stem + ".jpg")).write_bytes(outputs["composite_jpeg"])
            times["write"].append(clock() - t)
            t = clock()
            _draft_decode(data, engine.input_size)
            times["alt: decode with draft"].append(clock() - t)
            t = clock()
            cv2.imdecode(np.frombuffer(data, np.uint8), getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR))  # as decode_image
            times["alt: cv2.imdecode"].append(clock() - t)
            rgba = np.dstack([rgb, cv2.convertScaleAbs(prob, alpha=255.0)])
            t = clock()
            png_bytes(rgba, config.png_compression)
            times["alt: cut-out PNG, ISA-L"].append(clock() - t)
            bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)  # OpenCV's channel order, outside the clock
            t = clock()
            encode(".png", bgra,
                   [cv2.IMWRITE_PNG_COMPRESSION, config.png_compression, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP])
            times["alt: cut-out PNG, OpenCV"].append(clock() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16, help="photos")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=1333)
    parser.add_argument("--size", type=int, default=320, help="input size of the untrained export")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ONNX Runtime threads")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)

    from inference_throughput import make_images

    from tasks.core.heap import keep_freed_memory
    from tasks.serving.engines import load_engine

    cv2.setNumThreads(1)
    keep_freed_memory()  # as `bgremoval remove` runs (tasks.core.heap)
    tmp = Path(tempfile.mkdtemp(prefix="bgremoval-infer-profile-"))
    try:
        paths = make_images(tmp / "images", args.n, args.width, args.height)
        model, described = _model_path(tmp, args.size)
        engine = load_engine(model, threads=args.threads)
        out = tmp / "out"
        out.mkdir()
        profile(paths[:2], engine, out, 1)  # warm-up
        load_before = os.getloadavg()[0]
        times = profile(paths, engine, out, args.repeat)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {stage: statistics.median(values) * 1000 for stage, values in times.items()}
    total = sum(medians[s] for s in STAGES)
    print(f"{args.n} photos {args.width}x{args.height} JPEG, {args.repeat} rounds, model {described}, "
          f"input {engine.input_size} px, {args.threads} ORT threads, 1 OpenCV thread, "
          f"load {load_before:.2f} before / {load_after:.2f} after")
    print(f"\n{'stage':<24}{'ms/photo':>10}{'share':>8}")
    for stage in STAGES:
        print(f"{stage:<24}{medians[stage]:>10.1f}{medians[stage] / total:>8.1%}")
    print(f"{'sum (one after another)':<24}{total:>10.1f}{'':>8}  = {1000 / total:.2f} photos/s")
    for stage, against in ALTERNATIVES.items():
        print(f"{stage:<24}{medians[stage]:>10.1f}{'':>8}  (vs {against} {medians[against]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
