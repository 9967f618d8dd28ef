"""Quality on real photos: train on ``../shared/data/viton-garments``, evaluate, register.

The data set: 2,982 studio photos of upper-body garments on white (192×256, silver-standard
masks; see ``../shared/data/README.md``). The benchmark runs the project's own stages on it, the
same functions the training DAG calls:

1. cleaning (``tasks.ingest``) at working size 256, i.e. the native resolution, into a dataset
   version under ``--work`` (the data folder is linked, never written);
2. one product cluster, ``tops``: the set holds only upper-body garments, so k-means would only
   split colours (stated in the output);
3. a hash-stable 80/10/10 train/val/test split (``tasks.splits``, seed 0), printed;
4. training (``tasks.train.ddp.launch_local``): U2-NetP, ``--workers`` torch.distributed
   processes, channels-last, autocast bf16 where the CPU has it, ``--epochs`` at
   ``--input-size`` (default 192 px; 320 on a GPU machine);
5. evaluation of the test split at the photos' own resolution (``tasks.evaluate.score_dataset``)
   and the seed's table beside the seed's numbers;
6. the production quality threshold (``tasks.calibration``), calibrated on val to route photos
   whose IoU would fall below 97 % to people, and its routing precision/recall on test;
7. registration (``tasks.registry``) as ``--model-name`` with the alias ``champion`` in the MLflow
   store ``--mlflow`` (default: SQLite under ``--work``), so that
   ``MLFLOW_TRACKING_URI=... bgremoval evaluate --model models:/<name>@champion --images … --masks …``
   scores it on any other labelled folder.

Run (about an hour on a 2-core CPU with the defaults)::

    .venv/bin/python benchmarks/quality_real.py --epochs 5 --input-size 192
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "viton-garments"
SEED_TABLE = {"mean_iou": 0.99435, 0.95: 0.993, 0.97: 0.987, 0.99: 0.931}


def _prepare(work: Path, working_size: int) -> dict:
    from tqdm import tqdm

    from tasks import ingest
    from tasks.cleaning import CleaningConfig
    from tasks.manifest import read_table, write_table
    from tasks.splits import SplitConfig, split_dataset

    raw = work / "bucket" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    link = raw / "viton-garments"
    if not link.exists():
        link.symlink_to(DATA, target_is_directory=True)
    config = CleaningConfig(working_size=working_size)
    plan = ingest.plan_batch(str(work / "bucket"), "viton-garments", config, shard_size=500)
    manifest_url = f"{plan['dataset_url']}/manifest.parquet"
    if not Path(manifest_url).exists():
        results = [ingest.clean_shard(url, plan["dataset_url"], "viton-garments", config)
                   for url in tqdm(plan["shard_urls"], desc="cleaning", unit="shard")]
        summary = ingest.finalize_dataset(plan["dataset_url"], "viton-garments", [r["result_url"] for r in results],
                                          plan["listing_rejects_url"])
        print(ingest.format_summary(summary))
    manifest = read_table(manifest_url)
    manifest["cluster"] = manifest["cluster"].where(manifest["status"] != "ok", "tops")
    write_table(manifest, manifest_url)
    splits = split_dataset(plan["dataset_url"], SplitConfig(0.8, 0.1, 0.1, seed=0))
    print(f"split (hash of the stem, seed 0): {splits['totals']}")
    return {"dataset_url": plan["dataset_url"], "version": plan["version"], "splits": splits["totals"]}


def _seed_comparison(summary: dict) -> str:
    rows = [("mean IoU", summary["mean_iou"], SEED_TABLE["mean_iou"])]
    rows += [(f"images ≥ {th * 100:g} % IoU", summary["share_at_least"][th], SEED_TABLE[th]) for th in (0.95, 0.97, 0.99)]
    lines = [f"{'':<22}{'this run':>12}{'seed':>12}"]
    lines += [f"{name:<22}{ours * 100:>11.3f}%{seed * 100:>11.3f}%" for name, ours, seed in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bgremoval-quality-real", help="working folder (dataset, runs, MLflow)")
    parser.add_argument("--model", default="u2netp", choices=["u2netp", "u2net"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=2, help="torch.distributed worker processes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--mlflow", help="MLflow tracking URI (default: SQLite under --work)")
    parser.add_argument("--model-name", default="bgremoval-u2net-viton", help="registered model name")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} is not here: this benchmark needs ../shared/data/viton-garments", file=sys.stderr)
        return 2

    from tasks import registry
    from tasks.evaluate import score_dataset
    from tasks.metrics import format_summary, summarise
    from tasks.train.config import TrainConfig
    from tasks.train.ddp import launch_local

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking = args.mlflow or f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    os.environ.setdefault("BGREMOVAL_MLFLOW_ARTIFACTS", str(work / "mlflow-artifacts"))

    started = time.time()
    dataset = _prepare(work, working_size=256)
    prepared = time.time()
    run_name = f"{args.model}-{args.input_size}px-{args.epochs}ep-{time.strftime('%Y%m%d-%H%M%S')}"
    config = TrainConfig(
        dataset_url=dataset["dataset_url"], output_url=str(work / "runs" / run_name), model=args.model,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, input_size=args.input_size,
        warmup_epochs=0.3, channels_last=True, amp="auto", device=args.device, use_augmented=False,
        cache_dir=str(work / "cache"), mlflow_tracking_uri=tracking, mlflow_experiment="quality-real",
        mlflow_run_name=run_name, seed=0,
    )
    (work / "runs").mkdir(exist_ok=True)
    print(f"training {args.model} at {args.input_size} px, {args.epochs} epochs, {args.workers} workers × "
          f"batch {args.batch_size}; log: {work / 'runs' / (run_name + '.log')}", flush=True)
    result = launch_local(config, nproc=args.workers, log_path=str(work / "runs" / f"{run_name}.log"))
    trained = time.time()
    for epoch in result.history:
        print(f"  epoch {epoch['epoch']}: train loss {epoch['train_loss']:.4f}  val IoU "
              f"{(epoch['val_iou'] or 0) * 100:.2f} %  {epoch['images'] / epoch['seconds']:.2f} img/s")

    scores, meta = score_dataset(config.output_url, dataset["dataset_url"], "test")
    summary = summarise(scores)
    evaluated = time.time()
    print(f"\n== test split: {summary['n']} photos at their own resolution (192×256), prediction at "
          f"{meta['input_size']} px, threshold 0.5")
    print(format_summary(summary))
    print("\n" + _seed_comparison(summary))

    from tasks.calibration import calibrate_model

    calibration = calibrate_model(config.output_url, dataset["dataset_url"], target_iou=0.97)
    print("\n== production routing\n" + calibration["text"])

    registered = registry.register_model(
        config.output_url, args.model_name, run_id=result.mlflow_run_id,
        tags={"test_mean_iou": summary["mean_iou"], "dataset_version": dataset["version"], "data": "viton-garments"},
    )
    registry.promote(args.model_name, registered["version"], reason="quality_real benchmark")
    print(f"\nregistered {registered['model_uri']} (alias champion) in {tracking}")
    print(f"score it elsewhere: MLFLOW_TRACKING_URI={tracking} bgremoval evaluate "
          f"--model models:/{args.model_name}@champion --images DIR --masks DIR")
    timing = {"prepare_s": round(prepared - started), "train_s": round(trained - prepared),
              "evaluate_s": round(evaluated - trained), "total_s": round(time.time() - started)}
    print(f"time: {json.dumps(timing)}; training {result.images_per_s:.2f} img/s over {result.world_size} workers")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "timing": timing, "config": config.to_dict(),
                                               "routing": {k: v for k, v in calibration.items() if k != "text"},
                                               "splits": dataset["splits"], "model_uri": registered["model_uri"],
                                               "history": result.history}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
