"""int8 on the published U2-NetP: how much faster, and how far the masks move.

ONNX Runtime's static quantisation (QDQ, uint8 activations, int8 per-channel weights, min/max
calibration) is applied to the published ``u2netp.onnx`` (converted to opset 13 first), calibrated
on ``--n-calib`` real photos from the training side of ``../shared/data`` (hash of the stem < 0.8,
seed 0), twice: to every layer (``int8-all``), and as ``bgremoval quantize`` does it
(:func:`tasks.serving.quantize.quantize_model`: the tensors with one dominating channel and their
convolutions left in float; ``int8``). Then, in one run:

* **speed**, model only, batch 1, rows interleaved over ``--repeat`` rounds (each keeps its
  fastest): fp32 and int8, each as one session with all cores' threads and as one single-thread
  session per core running side by side, through the project's engines: ONNX Runtime and, when it
  is installed, OpenVINO (rows ``.../ov``; ``--runtimes``) on the same files;
* **masks**, on the test side (hash >= 0.9, ``--n-test`` photos per set): mean IoU against the
  ground-truth masks and the share of photos at >= 95/97/99 %, fp32 beside both int8 files, and
  how far each int8 mask agrees with the fp32 one (IoU between the two);
* **why**, the layers where ``int8-all`` loses the most signal (``--layers``): per tensor,
  the signal-to-quantisation-noise ratio against fp32
  (``onnxruntime.quantization.qdq_loss_debug``), and the drop at each node over its inputs.

Nothing is written to the repository; the quantised file goes to a temporary folder (``--keep DIR``
keeps it). Needs ``../shared/data`` and the published weights (``bgremoval pretrained fetch``).

    .venv/bin/python benchmarks/int8_probe.py                # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from tasks.serving.engines import ONNX_RUNTIMES, openvino_installed  # noqa: E402
from tasks.serving.quantize import DEFAULT_DOMINANCE  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("viton-garments", "ccp-people")


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def pick_photos(set_name: str, lo: float, hi: float, limit: int) -> list[tuple[Path, Path]]:
    """Up to ``limit`` (image, mask) pairs of a set whose stem hashes into ``[lo, hi)``."""
    from tasks.data.splits import stem_uniform

    folder = DATA / set_name
    stems = sorted(p.stem for p in (folder / "images").glob("*.jpg"))
    chosen = [s for s in stems if lo <= stem_uniform(s, 0) < hi][:limit]
    return [(folder / "images" / f"{s}.jpg", folder / "masks" / f"{s}.png") for s in chosen]


def network_input(path: Path) -> np.ndarray:
    """The 1×3×320×320 float32 input of one photo, as the project's engine prepares it."""
    from tasks.model.preprocess import prepare_input

    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return prepare_input(rgb, 320)[None]


def quantise(src: str, work: Path, calibration: list[np.ndarray]) -> tuple[str, str]:
    """Static QDQ int8 of ``src``; returns ``(float model at opset 13, int8 model)`` paths."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    opset13 = work / "fp32-opset13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(src), 13), str(opset13))
    prepared = work / "fp32-prepared.onnx"
    quant_pre_process(str(opset13), str(prepared), skip_symbolic_shape=True)
    input_name = onnx.load(str(prepared)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{input_name: x} for x in calibration])

        def get_next(self):
            return next(self._batches, None)

    int8 = work / "int8.onnx"
    quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return str(prepared), str(int8)


def runner(path: str, runtime: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The fused probability map of a 1×3×S×S input, from the project's engine for ``runtime``
    (``onnx``: ONNX Runtime, ``openvino``) with ``threads`` threads."""
    from tasks.serving.engines import load_engine

    engine = load_engine(path, backend=runtime, threads=threads)
    return lambda x: engine.predict(x)[0]


def time_rows(models: dict[str, tuple[str, str]], inputs: list[np.ndarray], repeat: int) -> list[dict]:
    """Model-only img/s per (model, layout), interleaved rounds, fastest round kept; ``models``
    maps a row name to ``(file, runtime)``."""
    cores = _cores()
    layouts = {f"1 session x {cores} threads": [1, cores], f"{cores} sessions x 1 thread": [cores, 1]}
    runners = {(m, lay): [runner(path, runtime, threads) for _ in range(count)]
               for m, (path, runtime) in models.items() for lay, (count, threads) in layouts.items()}
    for group in runners.values():
        for run in group:
            run(inputs[0])
    best: dict[tuple[str, str], dict] = {}
    for _ in range(repeat):
        for key, group in runners.items():
            share = [inputs[i::len(group)] for i in range(len(group))]
            threads = [threading.Thread(target=lambda run=run, xs=xs: [run(x) for x in xs])
                       for run, xs in zip(group, share, strict=True)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rate = len(inputs) / (time.perf_counter() - start)
            if key not in best or rate > best[key]["img_s"]:
                best[key] = {"model": key[0], "layout": key[1], "img_s": rate, "load": os.getloadavg()[0]}
    return list(best.values())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mask_rows(models: dict[str, tuple[str, str]], pairs: dict[str, list[tuple[Path, Path]]]) -> list[dict]:
    """Per set: IoU against the ground truth for each model, and int8's agreement with fp32."""
    rows = []
    runners = {m: runner(path, runtime, _cores()) for m, (path, runtime) in models.items()}
    for set_name, items in pairs.items():
        ious: dict[str, list[float]] = {m: [] for m in models}
        agreement: dict[str, list[float]] = {m: [] for m in models}
        for image_path, mask_path in items:
            truth = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
            x = network_input(image_path)
            masks = {}
            for m, run in runners.items():
                prob = run(x)[0]
                masks[m] = cv2.resize(prob, truth.shape[::-1], interpolation=cv2.INTER_LINEAR) > 0.5
                ious[m].append(_iou(masks[m], truth))
            for m in models:
                agreement[m].append(_iou(masks["fp32"], masks[m]))
        for m in models:
            v = np.asarray(ious[m])
            rows.append({"set": set_name, "model": m, "n": len(v), "mean": v.mean() * 100,
                         **{f">={t}": (v >= t / 100).mean() * 100 for t in (95, 97, 99)},
                         "agreement": float(np.mean(agreement[m])) * 100 if m != "fp32" else None,
                         "agreement_min": float(np.min(agreement[m])) * 100 if m != "fp32" else None})
    return rows


def worst_layers(fp32: str, int8: str, inputs: list[np.ndarray], work: Path, top: int) -> list[tuple]:
    """The nodes where the int8 model's signal-to-noise against fp32 drops the most."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    graph = onnx.load(fp32).graph
    name = graph.input[0].name
    producer = {out: node for node in graph.node for out in node.output}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{name: x} for x in inputs])

        def get_next(self):
            return next(self._batches, None)

    activations = {}
    for tag, path in (("fp32", fp32), ("int8", int8)):
        augmented = work / f"{tag}-all-outputs.onnx"
        modify_model_output_intermediate_tensors(path, str(augmented))
        activations[tag] = collect_activations(str(augmented), Reader())
    errors = compute_activation_error(create_activation_matching(activations["int8"], activations["fp32"]))
    sqnr = {t: e["xmodel_err"] for t, e in errors.items()}

    def upstream(tensor: str, depth: int = 0) -> list[float]:
        if tensor in sqnr:
            return [sqnr[tensor]]
        node = producer.get(tensor)
        if node is None or depth > 3:
            return []
        return [v for i in node.input for v in upstream(i, depth + 1)]

    drops = []
    for tensor, value in sqnr.items():
        node = producer.get(tensor)
        if node is None:
            continue
        before = [v for i in node.input for v in upstream(i)]
        if before:
            drops.append((min(before) - value, node.name, node.op_type, min(before), value))
    return sorted(drops, reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-calib", type=int, default=24, help="calibration photos per set")
    parser.add_argument("--n-test", type=int, default=60, help="test photos per set")
    parser.add_argument("--n-time", type=int, default=12, help="photos per timed round")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8, help="worst layers to list")
    parser.add_argument("--keep", help="copy the int8 model (float islands) here")
    parser.add_argument("--dominance", type=float, default=DEFAULT_DOMINANCE,
                        help="bgremoval quantize's --dominance (lower: more left in float)")
    parser.add_argument("--runtimes", nargs="+", choices=ONNX_RUNTIMES,
                        default=list(ONNX_RUNTIMES) if openvino_installed() else ["onnx"],
                        help="run every file on these (OpenVINO rows are named .../ov; fp32 on ONNX Runtime is "
                             "the reference); default: both when OpenVINO is installed")
    args = parser.parse_args(argv)
    if "onnx" not in args.runtimes:
        parser.error("--runtimes needs onnx: fp32 on ONNX Runtime is every row's reference")
    if not DATA.is_dir():
        print(f"{DATA} not present: nothing to probe")
        return 0
    from tasks.model.published import require_pretrained_onnx

    src = str(require_pretrained_onnx())
    calibration = [network_input(img) for s in SETS for img, _ in pick_photos(s, 0.0, 0.8, args.n_calib)]
    tests = {s: pick_photos(s, 0.9, 1.0, args.n_test) for s in SETS}
    work = Path(tempfile.mkdtemp(prefix="bgremoval-int8-"))
    try:
        print(f"{_cores()} cores, load {os.getloadavg()[0]:.2f}; calibration {len(calibration)} photos")
        start = time.perf_counter()
        fp32, int8 = quantise(src, work, calibration)
        print(f"int8-all quantised in {time.perf_counter() - start:.0f} s")
        from tasks.serving.quantize import quantize_model

        report = quantize_model(src, str(work / "int8-islands.onnx"), calibration, dominance=args.dominance)
        print(f"int8 quantised in {report.seconds:.0f} s; left in float: {', '.join(report.float_nodes)} "
              f"(tensors with one dominating channel: {report.dominated_tensors})")
        if args.keep:
            shutil.copy(report.output_path, args.keep)
        files = {"fp32": fp32, "int8-all": int8, "int8": report.output_path}
        models = {name if runtime == "onnx" else f"{name}/ov": (path, runtime)
                  for runtime in args.runtimes for name, path in files.items()}
        timing_inputs = [network_input(img) for s in SETS for img, _ in tests[s][: args.n_time // 2]]
        speed = time_rows(models, timing_inputs, args.repeat)
        base = {r["layout"]: r["img_s"] for r in speed if r["model"] == "fp32"}
        print(f"\nmodel only, batch 1, {len(timing_inputs)} photos, {args.repeat} interleaved rounds:")
        print(f"{'model':<12} {'layout':<26} {'img/s':>6} {'vs fp32':>8} {'load':>5}")
        for r in speed:
            print(f"{r['model']:<12} {r['layout']:<26} {r['img_s']:>6.2f} {r['img_s'] / base[r['layout']]:>7.2f}x "
                  f"{r['load']:>5.2f}")
        print("\nmasks on the test photos (IoU with the ground truth; agreement = IoU of the int8 mask with fp32's):")
        print(f"{'set':<16} {'model':<12} {'n':>4} {'mean':>8} {'>=95':>6} {'>=97':>6} {'>=99':>6} {'agreement':>10} {'min':>6}")
        for r in mask_rows(models, tests):
            agree = f"{r['agreement']:>9.2f}% {r['agreement_min']:>5.1f}%" if r["agreement"] is not None else ""
            print(f"{r['set']:<16} {r['model']:<12} {r['n']:>4} {r['mean']:>7.3f}% {r['>=95']:>5.1f}% "
                  f"{r['>=97']:>5.1f}% {r['>=99']:>5.1f}% {agree}")
        print(f"\nwhere int8-all loses the signal (SQNR in dB against fp32, on {min(4, len(calibration))} photos):")
        print(f"{'node':<14} {'op':<8} {'inputs':>7} {'output':>7} {'drop':>6}")
        for drop, node, op, before, after in worst_layers(fp32, int8, calibration[:4], work, args.layers):
            print(f"{node:<14} {op:<8} {before:>7.1f} {after:>7.1f} {drop:>6.1f}")
        print(f"load at end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
