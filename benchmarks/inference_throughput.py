"""Background-removal throughput: our ``remove`` path beside rembg, on the same ONNX model.

What is measured, per model (U2-NetP / U2-Net) exported once with
:func:`tasks.model.export.export_onnx` at ``--size`` (320, what rembg's ``u2net_custom`` session
feeds): U2-NetP with the published weights converted into the project's model when they are on
this machine, U2-Net untrained (no published weights ship in a wheel). Untrained weights give flat
masks, whose PNGs encode faster than real ones: rows on untrained weights flatter the path that
spends more of its time encoding.

* ``bgremoval``: what ``bgremoval remove`` does per image — read the JPEG from disk, decode
  (EXIF applied), preprocess, the model on batches of ``--batch`` (the threads given) run by each
  of ``--runtimes`` (``onnx``: ONNX Runtime, rows ``ORT``; ``openvino``: OpenVINO, rows ``OV``;
  both by default when OpenVINO is installed), resize the map back and refine its edges on the photo
  (:mod:`tasks.model.refine`, on by default as in ``bgremoval remove``; ``--no-refine-too`` adds each
  float row without it, interleaved, rows ``no-refine``), quality score, RGBA PNG
  cut-out **and** JPEG on white, both written to disk
  (:func:`tasks.serving.pipeline.iter_remove_backgrounds` + ``write_outputs``);
* ``model only``: the model alone on the same photos, decoded and preprocessed before the clock
  starts, in the same batches, runtime and threads; each float bgremoval row's "of model" column is
  its rate as a share of this one's in the same round (what the rest of the path costs), from the
  round the bgremoval row keeps;
* ``rembg``: rembg 2.0.86, ``new_session("u2net_custom", model_path=<the same .onnx>)`` with the
  file inside ``U2NET_HOME`` and ``OMP_NUM_THREADS`` = the same threads, ``remove(bytes)`` per
  image (decode, EXIF, inference at 320, resize, cut-out, PNG encode), the PNG written to disk.

``--published`` times the published ``u2netp.onnx`` (rembg's own file) instead of the exports;
``--rembg-cli PATH`` then also times rembg's own command line (``rembg p -m u2netp``, needs
``rembg[cli]``, e.g. in a separate venv) against ``bgremoval remove`` on the same folder, as the
marginal rate after start-up (a run on one photo subtracted from a run on all); and
``--int8`` adds ``bgremoval quantize``'s int8 copy of each file (:mod:`tasks.serving.quantize`;
calibrated on 48 real photos from ``../shared/data`` when present), run with one ONNX Runtime
session and with one single-thread session per core (batches of 2 or more); its masks' IoU on real
photos is ``int8_probe.py``'s table.

Images: ``--n`` synthetic product photos (:mod:`tasks.dev.synth`) resized to exactly ``--width`` ×
``--height`` (1000×1333 by default, the size DESIGN.md's rembg numbers were taken at), JPEG q92,
in a temporary folder. One warm-up pass of ``--warmup`` images per row is not timed. All rows run
``--repeat`` times, interleaved, and each keeps its fastest round (other work on the machine only
ever slows a round down); "load" is the 1-minute load average after that round. The process keeps
freed memory in its heap (:func:`tasks.core.heap.keep_freed_memory`), as ``bgremoval remove``
does, so the in-process rows (ours, the model alone, rembg's API) all run on that allocator;
the command-line rows run in their own processes.

Columns: img/s over the whole timed run (wall clock); latency p50/p95 per image — for rembg the
time of one ``remove`` call plus read and write, for bgremoval from the start of an image's read
to its outputs being encoded (batching trades latency for throughput); the speed-up of each
bgremoval row over rembg on the same model. rembg is optional (``.venv/bin/pip install
rembg==2.0.86``; it is not a project dependency): without it its rows are skipped.

Run from the project root:

    .venv/bin/python benchmarks/inference_throughput.py                  # both models, ~3-5 min on 2 cores
    .venv/bin/python benchmarks/inference_throughput.py --models u2netp --n 12
    .venv/bin/python benchmarks/inference_throughput.py --published --int8 --batches 1 2   # rembg's own file, fp32 and int8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from tasks.core.heap import keep_freed_memory  # noqa: E402
from tasks.serving.engines import ONNX_RUNTIMES, openvino_installed  # noqa: E402

RUNTIME_LABELS = {"onnx": "ORT", "openvino": "OV"}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def make_images(folder: Path, n: int, width: int, height: int, seed: int = 11) -> list[str]:
    """Write ``n`` synthetic product JPEGs of exactly ``width``×``height``; return their paths."""
    from tasks.dev.synth import SynthConfig, encode_jpeg, render_item

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    config = SynthConfig(n=n, seed=seed, max_side=max(width, height))
    for i in range(n):
        item = render_item(i, config)
        image = cv2.resize(item.image, (width, height), interpolation=cv2.INTER_CUBIC)
        path = folder / f"{item.stem}.jpg"
        path.write_bytes(encode_jpeg(image, 92))
        paths.append(str(path))
    return paths


def export_model(name: str, size: int, home: Path) -> tuple[str, str]:
    """Export ``name`` with the project's exporter to ``home/<name>_custom.onnx``: U2-NetP with the
    published weights when they are on this machine (real masks: the PNG encodes of both paths
    cost what they cost on real work), otherwise untrained weights (flat masks that encode
    faster). Returns ``(path, row name)``."""
    import torch

    from tasks.model.export import export_onnx
    from tasks.model.pretrained import load_pretrained_model
    from tasks.model.published import PUBLISHED, find_pretrained_onnx
    from tasks.model.u2net import build_model

    home.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    path = str(home / f"{name}_custom.onnx")
    if name in PUBLISHED and find_pretrained_onnx(model=name) is not None:
        model, label = load_pretrained_model(model=name), f"{name} (export, published weights)"
    else:
        model, label = build_model(name), f"{name} (export, untrained)"
    export_onnx(model.eval(), path, size, model_name=name, check=False)
    return path, label


def published_model(home: Path) -> str:
    """The published ``u2netp.onnx`` (rembg's file) copied into ``home``; the path."""
    from tasks.model.published import require_pretrained_onnx

    home.mkdir(parents=True, exist_ok=True)
    path = home / "u2netp-published.onnx"
    shutil.copy(require_pretrained_onnx(), path)
    return str(path)


def int8_model(onnx_path: str, calibration_paths: list[str], out: Path) -> str:
    """``bgremoval quantize`` of ``onnx_path``, calibrated on ``calibration_paths``; the path."""
    from tasks.core.codecs import decode_image
    from tasks.model.preprocess import prepare_input
    from tasks.serving.engines import load_engine
    from tasks.serving.quantize import quantize_model

    engine = load_engine(onnx_path)
    inputs = [prepare_input(decode_image(Path(p).read_bytes()), engine.input_size, engine.resize, engine.mean,
                            engine.std)[None] for p in calibration_paths]
    report = quantize_model(onnx_path, str(out), inputs)
    print(f"int8 of {Path(onnx_path).name}: calibrated on {len(inputs)} photos in {report.seconds} s, "
          f"{len(report.float_nodes)} nodes left in float")
    return str(out)


def _real_photos(n: int) -> list[str]:
    """Up to ``n`` real photos from ``../shared/data`` (both sets, spread), or [] when absent."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    found = []
    for name in ("viton-garments", "ccp-people"):
        files = sorted((data / name / "images").glob("*.jpg")) if (data / name).is_dir() else []
        found += [str(f) for f in files[:: max(1, len(files) // max(1, n // 2))][: n // 2]]
    return found


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return statistics.median(ordered), p95


def run_ours(onnx_path: str, paths: list[str], out: Path, threads: int, batch: int, warmup: int,
             png_compression: int, runtime: str, sessions: int = 1, refine: bool = True) -> dict:
    """Time the bgremoval path on ``paths`` with the model on ``runtime`` (edge refinement on, as
    ``bgremoval remove`` runs, unless ``refine`` is false); returns img/s and latencies."""
    from tasks.model.refine import RefineConfig
    from tasks.serving.engines import load_engine
    from tasks.serving.pipeline import InferenceConfig, iter_remove_backgrounds, write_outputs

    engine = load_engine(onnx_path, backend=runtime, threads=threads, sessions=sessions)
    config = InferenceConfig(batch_size=batch, io_threads=threads, png_compression=png_compression,
                             refine=RefineConfig() if refine else None)

    def once(batch_paths: list[str]) -> list[float]:
        latencies = []
        for result in iter_remove_backgrounds(batch_paths, engine, config):
            if not result.ok:
                raise RuntimeError(f"{result.source_url}: {result.error}")
            write_outputs(result, str(out))
            latencies.append(result.seconds)
        return latencies

    once(paths[:warmup])
    start = time.perf_counter()
    latencies = once(paths)
    wall = time.perf_counter() - start
    return {"images_per_s": len(paths) / wall, "latencies": latencies}


def run_model_only(onnx_path: str, paths: list[str], threads: int, batch: int, warmup: int, runtime: str) -> dict:
    """Time the model alone on ``paths`` (decoded and preprocessed before the clock starts), in
    batches of ``batch`` on ``runtime`` with the same threads: the rate the end-to-end rows of the
    same batch and runtime are read against."""
    from tasks.core.codecs import decode_image
    from tasks.model.preprocess import prepare_input
    from tasks.serving.engines import load_engine

    engine = load_engine(onnx_path, backend=runtime, threads=threads)
    tensors = [prepare_input(decode_image(Path(path).read_bytes()), engine.input_size, engine.resize,
                             engine.mean, engine.std) for path in paths]

    def once(chosen: list[np.ndarray]) -> None:
        for start in range(0, len(chosen), batch):
            engine.predict(np.stack(chosen[start:start + batch]))

    once(tensors[:warmup])
    start = time.perf_counter()
    once(tensors)
    return {"images_per_s": len(paths) / (time.perf_counter() - start), "latencies": []}


def run_rembg(onnx_path: str, paths: list[str], out: Path, threads: int, warmup: int) -> dict | None:
    """Time rembg's ``u2net_custom`` session on ``paths``; None when rembg is not installed."""
    os.environ["U2NET_HOME"] = str(Path(onnx_path).parent)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        from rembg import new_session, remove
    except ImportError:
        return None
    session = new_session("u2net_custom", model_path=onnx_path)

    def once(batch_paths: list[str]) -> list[float]:
        latencies = []
        for path in batch_paths:
            t0 = time.perf_counter()
            png = remove(Path(path).read_bytes(), session=session)
            (out / (Path(path).stem + ".png")).write_bytes(png)
            latencies.append(time.perf_counter() - t0)
        return latencies

    once(paths[:warmup])
    start = time.perf_counter()
    latencies = once(paths)
    wall = time.perf_counter() - start
    return {"images_per_s": len(paths) / wall, "latencies": latencies}


def run_cli(command: list[str], env: dict[str, str], paths: list[str], work: Path) -> dict:
    """Time a command line that cuts out a folder (``command``, with ``{in}`` and ``{out}`` for the
    folders): once on one photo and once on all ``paths``, after an untimed run on one photo (a
    command's first start compiles and reads its imports: rembg's took 38 s once, more than a whole
    folder after it); img/s is the marginal rate ``(n - 1) / (t_n - t_1)``, so the command's start-up
    (imports, model load) is not counted for either tool. NaN when the folder took no longer than
    one photo (start-up varied more than the work: the round tells nothing)."""
    def timed(chosen: list[str]) -> float:
        folder, out = _fresh(work / "cli-in"), _fresh(work / "cli-out")
        for path in chosen:
            shutil.copy(path, folder)
        start = time.perf_counter()
        argv = [part.format(**{"in": folder, "out": out}) for part in command]
        subprocess.run(argv, env={**os.environ, **env}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    timed(paths[:1])
    one, all_of_them = timed(paths[:1]), timed(paths)
    rate = (len(paths) - 1) / (all_of_them - one) if all_of_them > one else math.nan
    return {"images_per_s": rate, "latencies": [], "startup_s": one}


#: ``bgremoval remove``'s own default ``--batch-size``, given explicitly so that the row says what ran.
CLI_BATCH = 4


def cli_rows(args: argparse.Namespace, onnx_path: str, paths: list[str], work: Path) -> list[tuple[dict, dict]]:
    """rembg's own command line (``rembg p -m u2netp``, the published file in ``U2NET_HOME``) and
    ``bgremoval remove`` on the same folder, both with ``--threads`` threads."""
    threads = {"OMP_NUM_THREADS": str(args.threads)}
    home = work / "rembg-home"  # rembg looks for <U2NET_HOME>/u2netp.onnx and checks its md5
    home.mkdir(exist_ok=True)
    shutil.copy(onnx_path, home / "u2netp.onnx")
    rembg = run_cli([args.rembg_cli, "p", "-m", "u2netp", "{in}", "{out}"], {"U2NET_HOME": str(home), **threads},
                    paths, work)
    ours = run_cli([str(Path(sys.executable).with_name("bgremoval")), "remove", "{in}", "-o", "{out}", "--model",
                    onnx_path, "--quiet", "--threads", str(args.threads), "--batch-size", str(CLI_BATCH)],
                   threads, paths, work)
    return [({"model": "u2netp (published)", "path": "rembg p -m u2netp (CLI)", "batch": 1}, rembg),
            ({"model": "u2netp (published)", "path": "bgremoval remove (CLI)", "batch": CLI_BATCH}, ours)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["u2netp", "u2net"])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--n", type=int, default=24, help="timed images per row")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=1333)
    parser.add_argument("--threads", type=int, default=_cores(), help="ORT intra-op threads for both (default: cores)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="bgremoval batch sizes to run")
    parser.add_argument("--png-compression", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2,
                        help="rounds of all rows, interleaved; each row keeps its fastest round")
    parser.add_argument("--skip-rembg", action="store_true")
    parser.add_argument("--no-refine-too", action="store_true",
                        help="also time every float bgremoval row without the edge refinement (--no-refine), interleaved")
    parser.add_argument("--published", action="store_true",
                        help="time the published u2netp.onnx (rembg's file) instead of untrained exports")
    parser.add_argument("--int8", action="store_true",
                        help="add rows for `bgremoval quantize`'s int8 copy of each file (1 session, and one "
                             "single-thread session per core), calibrated on 48 real photos from ../shared/data "
                             "when present, else on the benchmark's own images")
    parser.add_argument("--runtimes", nargs="+", choices=ONNX_RUNTIMES,
                        default=list(ONNX_RUNTIMES) if openvino_installed() else ["onnx"],
                        help="the model's runtimes for the bgremoval rows (default: both when OpenVINO is installed)")
    parser.add_argument("--rembg-cli", metavar="PATH",
                        help="with --published: also time rembg's own command line (this `rembg` executable, "
                             "e.g. from a venv with rembg[cli]) and `bgremoval remove` on the same folder, as the "
                             "marginal rate after start-up")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.rembg_cli and not args.published:
        parser.error("--rembg-cli needs --published (rembg's -m u2netp is the published file)")

    cv2.setNumThreads(1)
    keep_freed_memory()  # as `bgremoval remove` runs (tasks.core.heap); every in-process row shares the setting
    tmp = Path(tempfile.mkdtemp(prefix="bgremoval-infer-bench-"))
    rows = []
    try:
        paths = make_images(tmp / "images", args.n, args.width, args.height)
        warm = paths[: args.warmup]
        print(f"{args.n} images {args.width}x{args.height}, {args.threads} threads, {_cores()} cores, "
              f"load {os.getloadavg()[0]:.2f}")
        names = ["u2netp (published)"] if args.published else args.models
        for name in names:
            if args.published:
                onnx_path = published_model(tmp / "u2net_home")
            else:
                onnx_path, name = export_model(name, args.size, tmp / "u2net_home")
            int8_path = (int8_model(onnx_path, _real_photos(48) or paths, tmp / f"{Path(onnx_path).stem}.int8.onnx")
                         if args.int8 else None)
            best: dict[tuple[str, int], dict] = {}
            for _ in range(args.repeat):  # interleaved rounds: load from other work hits every row alike
                measured = []
                if not args.skip_rembg:
                    rembg = run_rembg(onnx_path, paths, _fresh(tmp / "out-rembg"), args.threads, len(warm))
                    if rembg is not None:
                        measured.append(({"model": name, "path": "rembg 2.0.86 (PNG)", "batch": 1}, rembg))
                for batch, runtime in itertools.product(args.batches, args.runtimes):
                    alone = run_model_only(onnx_path, paths, args.threads, batch, len(warm), runtime)
                    measured.append(({"model": name, "path": f"model only {RUNTIME_LABELS[runtime]} fp32",
                                      "batch": batch}, alone))
                    ours = run_ours(onnx_path, paths, _fresh(tmp / "out-ours"), args.threads, batch, len(warm),
                                    args.png_compression, runtime)
                    label = f"bgremoval {RUNTIME_LABELS[runtime]} fp32"
                    measured.append(({"model": name, "path": label, "batch": batch}, ours))
                    if args.no_refine_too:
                        raw = run_ours(onnx_path, paths, _fresh(tmp / "out-ours"), args.threads, batch, len(warm),
                                       args.png_compression, runtime, refine=False)
                        measured.append(({"model": name, "path": f"{label} no-refine", "batch": batch}, raw))
                    if int8_path is None:
                        continue
                    for sessions in sorted({1, min(args.threads, max(1, batch))}):
                        ours = run_ours(int8_path, paths, _fresh(tmp / "out-ours"), args.threads, batch, len(warm),
                                        args.png_compression, runtime, sessions=sessions)
                        label = f"bgremoval {RUNTIME_LABELS[runtime]} int8" + (f", {sessions} sess." if sessions > 1 else "")
                        measured.append(({"model": name, "path": label, "batch": batch}, ours))
                if args.rembg_cli:
                    measured += cli_rows(args, onnx_path, paths, tmp)
                _share_of_model(measured)
                for key, result in measured:
                    slot = (key["path"], key["batch"])
                    if slot not in best or _faster(result["images_per_s"], best[slot]["images_per_s"]):
                        best[slot] = {**key, **result, "load": os.getloadavg()[0]}
            rows.extend(best.values())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def kind(row: dict) -> tuple[str, bool]:  # command-line rows compare with rembg's command line
        return row["model"], row["path"].endswith("(CLI)")

    base = {kind(r): r["images_per_s"] for r in rows if r["path"].startswith("rembg")}
    print(f"\n{'model':<34} {'path':<30} {'batch':>5} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'vs rembg':>9} "
          f"{'of model':>9} {'load':>5}")
    for r in rows:
        p50, p95 = _percentiles(r["latencies"]) if r["latencies"] else (math.nan, math.nan)
        r["p50_ms"], r["p95_ms"] = p50 * 1000, p95 * 1000
        speedup = f"{r['images_per_s'] / base[kind(r)]:.2f}x" if kind(r) in base and "model only" not in r["path"] else "-"
        share = f"{r['of_model']:.0%}" if "of_model" in r else "-"
        print(f"{r['model']:<34} {r['path']:<30} {r['batch']:>5} {r['images_per_s']:>7.2f} "
              f"{r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} {speedup:>9} {share:>9} {r['load']:>5.1f}")
    for r in rows:
        if "startup_s" in r:
            print(f"{r['path']}: {r['startup_s']:.1f} s for one photo (start-up included, not in img/s)")
    print(f"load at end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: None if isinstance(v, float) and math.isnan(v) else v
                                                for k, v in r.items() if k != "latencies"} for r in rows], indent=2))
    return 0


def _share_of_model(measured: list[tuple[dict, dict]]) -> None:
    """Give each float bgremoval row of one round its rate as a share of the same round's model-only
    row of its runtime and batch (``of_model``)."""
    alone = {(key["path"].split()[2], key["batch"]): result["images_per_s"]
             for key, result in measured if key["path"].startswith("model only")}
    for key, result in measured:
        if key["path"].startswith("bgremoval") and " fp32" in key["path"]:
            result["of_model"] = result["images_per_s"] / alone[(key["path"].split()[1], key["batch"])]


def _faster(rate: float, than: float) -> bool:
    """Whether a round's img/s beats the best so far (a NaN round never does; any round beats NaN)."""
    return not math.isnan(rate) and (math.isnan(than) or rate > than)


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


if __name__ == "__main__":
    sys.exit(main())
