"""``bgremoval remove``: cut out photos from files, folders, ``s3://`` prefixes or stdin into a folder,
one named file (as rembg's ``rembg i``) or stdout, once or watching a hot folder.

Nothing here replaces an input: an output folder that is an input folder, or holds an input photo,
is refused before the model loads, and no output is written over any listed photo.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tasks.cli.environment import mlflow_environment, registry_missing_for, storage_options
from tasks.core.heap import keep_freed_memory

__all__ = ["FILE_OUTPUT_EXTENSIONS", "STREAM", "cmd_remove", "single_file_output"]

#: ``bgremoval remove``'s name for stdin (as an input) and stdout (as ``--out``).
STREAM = "-"
#: What ``bgremoval remove photo.jpg -o NAME`` writes into a file named NAME, by its extension:
#: the cut-out (the mask with ``--only-mask``), or the photo on the background.
FILE_OUTPUT_EXTENSIONS = (".png", ".jpg", ".jpeg")


#: Image file names `remove` cannot write (it writes PNG and JPEG): taken for a folder, they would
#: surprise.
_OTHER_IMAGE_SUFFIXES = frozenset({".webp", ".tif", ".tiff", ".gif", ".bmp", ".avif", ".heic"})


def single_file_output(inputs: list[str], out: str) -> bool:
    """True when one local photo (or stdin) is cut out into one file: ``-o`` names a PNG or JPEG
    on the local disk that is not a folder."""
    return (len(inputs) == 1 and (inputs[0] == STREAM or os.path.isfile(inputs[0])) and "://" not in out
            and not out.endswith(("/", os.sep)) and Path(out).suffix.lower() in FILE_OUTPUT_EXTENSIONS
            and not os.path.isdir(out))


def _refusal(args: argparse.Namespace, to_file: bool) -> str | None:
    """Why the arguments cannot work together, or None."""
    from tasks.serving.pipeline import path_key

    one_image = STREAM in args.inputs or args.out == STREAM or to_file
    suffix = Path(args.out).suffix.lower()
    if (not to_file and len(args.inputs) == 1 and os.path.isfile(args.inputs[0]) and suffix in _OTHER_IMAGE_SUFFIXES
            and not os.path.isdir(args.out)):
        return (f"cannot write {args.out}: one photo is written as a .png (the cut-out, or the mask with --only-mask) "
                "or a .jpg (on the background); give a folder for both")
    if to_file and args.only_mask and Path(args.out).suffix.lower() != ".png":
        return f"a mask is written as a PNG, not {args.out}"
    if to_file and args.mask:
        return "--mask writes a second file: give a folder as --out"
    if to_file and path_key(args.out) == path_key(args.inputs[0]):
        return f"refusing to overwrite the input {args.out} with an output"
    if one_image and args.watch:
        return "--watch reads folders or prefixes and writes into a folder"
    if one_image and len(args.inputs) != 1:
        return "'-' (stdin or stdout) and a named output file take exactly one input"
    return None


def _inference_config(args: argparse.Namespace, to_file: bool):
    """The :class:`~tasks.serving.pipeline.InferenceConfig` the arguments ask for (refinement set later,
    once the model is known)."""
    from tasks.serving.pipeline import InferenceConfig

    png_only = args.out == STREAM or (to_file and Path(args.out).suffix.lower() == ".png")
    return InferenceConfig(background=args.background, canvas=args.canvas, margin=args.margin,
                           mask=args.mask or args.only_mask, cutout=not args.only_mask,
                           composite=not (args.only_mask or png_only), decontaminate=args.decontaminate,
                           refine=None, batch_size=args.batch_size, io_threads=args.io_threads,
                           jpeg_quality=args.jpeg_quality, png_compression=args.png_compression,
                           max_pixels=round(args.max_megapixels * 1e6))


def _open_engine(args: argparse.Namespace, options: dict | None, say: Callable[[str], None]):
    """The engine for ``--model`` (by default the registry's champion, else the published weights) and
    the edge-refinement sentence; ``ValueError`` / ``FileNotFoundError`` when it cannot be opened."""
    from tasks.serving.engines import FlipAveragedEngine, default_model, load_engine, refinement_for

    model = args.model
    if model is None:
        mlflow_environment()  # a running stack's registry address, when there is one
        model, why = default_model(args.registered_model)
        say(f"no --model given: using {why}")
    elif missing := registry_missing_for(model):
        raise ValueError(missing)
    engine = load_engine(model, options, device=args.device, backend=args.backend, threads=args.threads,
                         sessions=args.sessions)
    if args.flip:
        engine = FlipAveragedEngine(engine)
    return engine, refinement_for(engine, args.refine)


def cmd_remove(args: argparse.Namespace) -> int:
    """``bgremoval remove``: 0 when every photo was cut out, 1 when one failed or an input was missing
    or left out, 2 when the arguments or the model cannot work, 130 when interrupted."""
    from tasks.serving.pipeline import check_output_location
    from tasks.serving.quality import load_calibration

    to_file = single_file_output(args.inputs, args.out)
    refusal = _refusal(args, to_file)
    if refusal:
        print(f"bgremoval remove: {refusal}", file=sys.stderr)
        return 2
    missing = [url for url in args.inputs if url != STREAM and "://" not in url and not os.path.exists(url)]
    if missing and len(missing) == len(args.inputs) and not args.watch:  # nothing to do: say so before loading a model
        for url in missing:
            print(f"bgremoval remove: {url}: no such file or folder", file=sys.stderr)
        return 1
    say = functools.partial(print, file=sys.stderr if args.out == STREAM else sys.stdout)
    if args.quiet:  # MLflow's own bar, when a registered model is downloaded
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    one_photo = STREAM in args.inputs or args.out == STREAM or to_file
    urls = [*args.inputs, args.out, args.model or ""]
    options = next((o for o in map(storage_options, urls) if o is not None), None)
    try:
        if args.out != STREAM and not to_file:
            check_output_location([url for url in args.inputs if url != STREAM], args.out, options)
        config = _inference_config(args, to_file)
        if not (one_photo or args.watch):  # a batch pass, then the process ends (tasks.core.heap)
            keep_freed_memory()  # before the engine's threads start: glibc's mallopt is not thread-safe
        engine, (refine, why) = _open_engine(args, options, say)
        config = dataclasses.replace(config, refine=refine)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bgremoval remove: {exc}", file=sys.stderr)
        return 2
    say(f"model: {engine.describe()}")
    say(f"edge refinement: {why}")
    if one_photo:
        return _remove_one(args.inputs[0], args.out, to_file, engine, config, options, say)
    calibration = load_calibration(engine.model_dir) if engine.model_dir else None
    threshold = calibration.threshold if calibration else None
    if args.watch:
        return _watch(args, engine, config, options, threshold)
    return _remove_batch(args, engine, config, options, threshold, say)


def _remove_batch(args: argparse.Namespace, engine, config, options: dict | None, threshold: float | None,
                  say: Callable[[str], None]) -> int:
    """Cut out every photo of the inputs into the ``--out`` folder and say how it went."""
    from tasks.serving.pipeline import IMAGE_EXTENSIONS, remove_to

    summary = remove_to(args.inputs, args.out, engine, config, options, progress=not args.quiet, threshold=threshold)
    if summary["images"] == 0:
        print(f"bgremoval remove: no photos found in {', '.join(args.inputs)} "
              f"(looked for {', '.join(IMAGE_EXTENSIONS)})", file=sys.stderr)
        return 1
    for line in summary_lines(summary):
        say(line)
    if summary["interrupted"]:
        return 130
    return 0 if summary["failed"] == 0 and not summary["problems"] else 1


def summary_lines(summary: dict) -> list[str]:
    """The lines ``bgremoval remove`` ends a batch with: counts, and the cut-outs worth a look."""
    done = summary["ok"] + summary["failed"]
    lines = [f"interrupted after {done} of {summary['images']} images"] if summary["interrupted"] else []
    lines.append(f"{summary['ok']} of {summary['images']} images done, {summary['failed']} failed, "
                 f"{len(summary['problems'])} inputs skipped, {summary['images_per_s']} img/s; outputs in "
                 f"{summary['out_url']}" + (f", one line per image (score, error, files) in {summary['results_url']}"
                                            if summary["results_url"] else ""))
    if summary["empty"]:
        lines.append(f"{summary['empty']} cut-outs are empty: the model found no product in the photo")
    if summary["threshold"] is not None:
        lines.append(f"{summary['below_threshold']} scored below the model's calibrated threshold "
                     f"{summary['threshold']:.4f} (production would send them to a person)")
    return lines


def _watch(args: argparse.Namespace, engine, config, options: dict | None, threshold: float | None) -> int:
    """``bgremoval remove --watch``: poll the inputs until Ctrl-C or SIGTERM, then say what was done."""
    import signal
    import threading

    from tasks.serving.watch import WatchState, watch

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"watching {', '.join(args.inputs)} every {args.interval:g} s; outputs in {args.out} (Ctrl-C stops)")
    state = WatchState()
    try:
        watch(args.inputs, args.out, engine, config, options, interval=args.interval, stop=stop, state=state,
              threshold=threshold)
    except KeyboardInterrupt:
        stop.set()
    print(f"stopped: {state.ok} images done, {state.failed} failed")
    return 0


def _remove_one(source: str, out: str, to_file: bool, engine, config, options: dict | None,
                say: Callable[[str], None]) -> int:
    """One image, from a file or stdin, into stdout, a named file (``to_file``) or a folder. stdout and
    a ``.png`` file get one PNG: the mask with ``--only-mask``, else the cut-out; a ``.jpg`` file gets
    the photo on the background."""
    from tasks.core import storage
    from tasks.serving.pipeline import cut_out_bytes, save_result

    try:
        data = sys.stdin.buffer.read() if source == STREAM else storage.read_bytes(source, options)
    except (OSError, ValueError) as exc:
        print(f"bgremoval remove: cannot read {source}: {exc}", file=sys.stderr)
        return 1
    stem = "stdin" if source == STREAM else Path(source.rstrip("/")).stem
    result = cut_out_bytes(data, engine, config, stem=stem, source=source)
    if not result.ok:
        print(f"bgremoval remove: {source}: {result.error}", file=sys.stderr)
        return 1
    png = result.cutout_png if config.cutout else result.mask_png
    if out == STREAM:
        sys.stdout.buffer.write(png)
        sys.stdout.buffer.flush()
        return 0
    if to_file:
        try:
            storage.write_bytes(out, png if Path(out).suffix.lower() == ".png" else result.composite_jpeg)
        except OSError as exc:
            print(f"bgremoval remove: cannot write {out}: {exc}", file=sys.stderr)
            return 1
        say(f"1 image done (quality score {result.score:.3f}): {out}")
        return 0
    written = save_result(result, out, config, options)
    if not result.ok:
        print(f"bgremoval remove: {source}: {result.error}", file=sys.stderr)
        return 1
    say(f"1 image done (quality score {result.score:.3f}): {', '.join(written.values())}")
    return 0
