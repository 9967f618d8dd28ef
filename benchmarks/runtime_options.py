"""The inference issue's remaining knobs, side by side: ONNX Runtime's graph optimisation levels, an
optimised model file cached beside the original, and the split of the cores between the model and
the decode/encode threads.

What is measured, on the published ``u2netp.onnx`` (rembg's file; ``bgremoval pretrained`` fetches it)
and ``--n`` synthetic 1000×1333 product JPEGs (``inference_throughput.make_images``):

* **graph optimisation** (model only, ONNX Runtime, batch 1, ``--threads`` intra-op threads): a session
  at each of ``ORT_DISABLE_ALL``, ``ORT_ENABLE_BASIC``, ``ORT_ENABLE_EXTENDED`` and ``ORT_ENABLE_ALL``
  (the project's setting, :class:`tasks.serving.engines.OnnxRuntimeEngine`), and one loading the file
  that ``ORT_ENABLE_EXTENDED`` wrote out (``optimized_model_filepath``) with optimisation off: the
  session's creation time and img/s on the same preprocessed inputs; the largest difference of any
  row's probabilities from ``ORT_ENABLE_ALL``'s;
* **the thread split** (end to end, :func:`tasks.serving.pipeline.iter_remove_backgrounds` with the
  outputs written, refinement on as ``bgremoval remove`` runs): each ``model threads × io threads``
  pair of ``--splits`` on each runtime of ``--runtimes``, at each batch of ``--batches``.

All rows of a table run in each of ``--repeat`` interleaved rounds and keep their fastest round;
"load" is the 1-minute load average after the row's kept round (graph rows) or after the row (splits). Needs the published file on this machine.

    .venv/bin/python benchmarks/runtime_options.py
    .venv/bin/python benchmarks/runtime_options.py --splits 2x2 2x1 1x2 --batches 1 4 --repeat 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from tasks.serving.engines import ONNX_RUNTIMES, openvino_installed  # noqa: E402

LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
CACHED = "ORT_ENABLE_EXTENDED, cached file"


def _session(path: str, level: str, threads: int, save_to: str | None = None):
    """An ONNX Runtime session as :class:`tasks.serving.engines.OnnxRuntimeEngine` makes one, at
    ``level``; ``save_to``: also write the optimised graph there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if save_to:
        options.optimized_model_filepath = save_to
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def graph_rows(model: str, tensors: list[np.ndarray], threads: int, work: Path) -> list[dict]:
    """One round of the graph-optimisation table."""
    cached = str(work / "u2netp.extended.onnx")
    if not Path(cached).exists():
        _session(model, "ORT_ENABLE_EXTENDED", threads, save_to=cached)
    reference = None
    rows = []
    for level in (*LEVELS, CACHED):
        start = time.perf_counter()
        session = _session(cached, "ORT_DISABLE_ALL", threads) if level == CACHED else _session(model, level, threads)
        created = time.perf_counter() - start
        name = session.get_inputs()[0].name
        session.run(None, {name: tensors[0][None]})  # warm-up
        start = time.perf_counter()
        first = [session.run(None, {name: t[None]})[0] for t in tensors]
        rate = len(tensors) / (time.perf_counter() - start)
        maps = np.concatenate(first)
        if level == "ORT_ENABLE_ALL":
            reference = maps
        rows.append({"level": level, "created_s": created, "images_per_s": rate, "maps": maps})
    for row in rows:
        row["max_diff"] = float(np.abs(row.pop("maps") - reference).max())
    return rows


def split_row(model: str, paths: list[str], out: Path, runtime: str, batch: int, model_threads: int,
              io_threads: int) -> float:
    """img/s of the end-to-end path with the model on ``model_threads`` and ``io_threads`` for the rest."""
    from tasks.model.refine import RefineConfig
    from tasks.serving.engines import load_engine
    from tasks.serving.pipeline import InferenceConfig, iter_remove_backgrounds, write_outputs

    engine = load_engine(model, backend=runtime, threads=model_threads)
    config = InferenceConfig(batch_size=batch, io_threads=io_threads, refine=RefineConfig())

    def once(chosen: list[str]) -> None:
        for result in iter_remove_backgrounds(chosen, engine, config):
            if not result.ok:
                raise RuntimeError(f"{result.source_url}: {result.error}")
            write_outputs(result, str(out))

    once(paths[:4])
    start = time.perf_counter()
    once(paths)
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16, help="photos")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="intra-op threads of the graph table (default: cores)")
    parser.add_argument("--splits", nargs="+", default=["2x2", "2x1", "1x2", "1x1"],
                        help="MODELxIO thread pairs of the split table")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runtimes", nargs="+", choices=ONNX_RUNTIMES,
                        default=list(ONNX_RUNTIMES) if openvino_installed() else ["onnx"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-graph", action="store_true")
    parser.add_argument("--skip-splits", action="store_true")
    args = parser.parse_args(argv)
    splits = [tuple(int(v) for v in s.lower().split("x")) for s in args.splits]

    from inference_throughput import _fresh, make_images, published_model

    from tasks.core.codecs import decode_image
    from tasks.model.preprocess import prepare_input

    cv2.setNumThreads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bgremoval-runtime-options-"))
    graph: dict[str, dict] = {}
    split: dict[tuple, dict] = {}
    try:
        paths = make_images(tmp / "images", args.n, 1000, 1333)
        model = published_model(tmp / "home")
        tensors = [prepare_input(decode_image(Path(p).read_bytes()), 320) for p in paths]
        print(f"{args.n} photos 1000x1333, published u2netp.onnx, {len(os.sched_getaffinity(0))} cores, "
              f"load {os.getloadavg()[0]:.2f}")
        for _ in range(args.repeat):
            if not args.skip_graph:
                for row in graph_rows(model, tensors, args.threads, tmp):
                    best = graph.get(row["level"])
                    if best is None or row["images_per_s"] > best["images_per_s"]:
                        graph[row["level"]] = {**row, "load": os.getloadavg()[0]}
            if not args.skip_splits:
                for runtime, batch, (model_threads, io_threads) in itertools.product(args.runtimes, args.batches, splits):
                    rate = split_row(model, paths, _fresh(tmp / "out"), runtime, batch, model_threads, io_threads)
                    key = (runtime, batch, model_threads, io_threads)
                    if key not in split or rate > split[key]["images_per_s"]:
                        split[key] = {"images_per_s": rate, "load": os.getloadavg()[0]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if graph:
        print(f"\nmodel only, ONNX Runtime, batch 1, {args.threads} threads")
        print(f"{'graph optimisation':<36}{'created s':>10}{'img/s':>8}{'max |diff|':>12}{'load':>6}")
        for level, row in graph.items():
            print(f"{level:<36}{row['created_s']:>10.2f}{row['images_per_s']:>8.2f}{row['max_diff']:>12.1e}{row['load']:>6.1f}")
    if split:
        print("\nend to end (refined, PNG + JPEG written)")
        print(f"{'runtime':<10}{'batch':>6}{'model thr':>10}{'io thr':>8}{'img/s':>8}{'load':>6}")
        for (runtime, batch, model_threads, io_threads), row in split.items():
            print(f"{runtime:<10}{batch:>6}{model_threads:>10}{io_threads:>8}{row['images_per_s']:>8.2f}{row['load']:>6.1f}")
    print(f"load at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
