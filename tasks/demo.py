"""``make demo``: the whole pipeline, as far as it is built, on a generated catalogue.

Starts the embedded stack (moto S3, Airflow's api-server on SQLite, MLflow on SQLite), uploads a
synthetic catalogue with bad inputs, and runs ``bgremoval_training`` with ``airflow dags test``.
When the run stops at the review gate, the demo plays the reviewer through the same HTTP APIs a
person's clicks use: it reads the proposed clusters from the review page's API, moves images whose
product type it knows from the generator's truth file, and approves in Airflow's REST API. Then it
prints what every stage produced.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tasks import stack, storage
from tasks.airflow_client import AirflowClient

DAG_ID = "bgremoval_training"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo generates, how much it augments, and whether it leaves the stack running."""

    n: int = 120
    bad: int = 26
    seed: int = 7
    max_side: int = 800
    target_per_cluster: int = 40
    epochs: int = 3
    train_input_size: int = 128
    max_moves: int = 12
    keep: bool = False


def _start_dag_run(conf: dict, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    argv = [stack.venv_bin("airflow"), "dags", "test", DAG_ID, "--conf", json.dumps(conf)]
    log = open(log_path, "wb")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=stack.PROJECT_ROOT)


def _wait_for_review_or_exit(client: AirflowClient, run: subprocess.Popen, log_path: Path) -> dict:
    while True:
        if run.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the DAG run ended before the review gate (exit {run.returncode}); log {log_path}:\n{tail}")
        try:
            return client.wait_for_human_task(DAG_ID, timeout=5)
        except TimeoutError:
            continue


def _truth(batch_url: str, options: dict):
    import pandas as pd

    truth = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(batch_url, "truth.csv"), options)), keep_default_na=False)
    return truth


def play_reviewer(client: AirflowClient, version: str, bucket: str, truth, max_moves: int) -> list[str]:
    """Correct the proposed clusters through the review page's HTTP API, using the known product types.

    Moves up to ``max_moves`` images whose true product type names another proposed cluster.
    Returns one line per correction made.
    """
    api = f"/bgremoval/api/datasets/{version}"
    state = client.request("GET", f"{api}/clusters?bucket={bucket}")
    by_name = {c["name"]: c["cluster"] for c in state["clusters"]}
    true_type = dict(zip(truth["stem"], truth["product_type"], strict=True))
    lines = []
    for cluster in state["clusters"]:
        for member in cluster["members"]:
            wanted = true_type.get(member["stem"], "")
            if len(lines) >= max_moves or not wanted or wanted == cluster["name"] or wanted not in by_name:
                continue
            client.request(
                "POST", f"{api}/corrections?bucket={bucket}",
                {"action": "move", "key": member["key"], "to_cluster": by_name[wanted]},
            )
            lines.append(f"moved {member['stem']} from '{cluster['name']}' to '{wanted}'")
    return lines


def _check_expected(truth, manifest) -> tuple[int, list[str]]:
    """Compare quarantine reasons with what the generator intended; return (matched, mismatches)."""
    bad = truth[truth["expected_reason"] != ""]
    matched, mismatches = 0, []
    for row in bad.itertuples():
        seen = set(manifest.loc[manifest["stem"].str.contains(row.stem, regex=False), "reason"].dropna())
        if row.expected_reason in seen:
            matched += 1
        else:
            mismatches.append(f"{row.stem}: expected {row.expected_reason}, got {sorted(seen) or 'nothing'}")
    return matched, mismatches


def _print_results(dataset_url: str, batch: str, truth, options: dict, log_path: Path) -> int:
    from tasks.ingest import format_summary
    from tasks.manifest import read_table
    from tasks.splits import format_split_summary, split_summary

    summary = json.loads(storage.read_bytes(storage.join(dataset_url, "summary.json"), options))
    manifest = read_table(summary["manifest_url"], options)
    print("\n== cleaning")
    print(format_summary(summary))
    conversions = Counter(
        c for value in manifest.loc[manifest["status"] == "ok", "conversions"].dropna() for c in value.split(",") if c
    )
    if conversions:
        print("  converted and kept: " + ", ".join(f"{name} {count}" for name, count in sorted(conversions.items())))
    matched, mismatches = _check_expected(truth, manifest)
    print(f"  bad inputs quarantined with the intended reason: {matched}/{matched + len(mismatches)}")
    for line in mismatches:
        print(f"    MISMATCH {line}")

    clusters = json.loads(storage.read_bytes(storage.join(dataset_url, "clusters", "clusters.json"), options))
    ok = manifest[manifest["status"] == "ok"]
    true_type = dict(zip(truth["stem"], truth["product_type"], strict=True))
    agreement = (ok["stem"].map(true_type) == ok["cluster"]).mean()
    print("\n== clusters (k-means proposal, then the reviewer's corrections)")
    ari = clusters.get("adjusted_rand_index")
    print(f"  proposal vs true product types: adjusted Rand index {ari:.3f}" if ari is not None else "")
    print(f"  after review, labels equal to the true product type: {agreement:.1%}")
    print(format_split_summary(split_summary(ok)))

    augmented = read_table(storage.join(dataset_url, "augmented", "manifest.parquet"), options)
    train = ok[ok["split"] == "train"]["cluster"].value_counts()
    added = augmented["cluster"].value_counts().reindex(train.index, fill_value=0)
    print("\n== augmentation (train split, rare clusters topped up)")
    for cluster in train.index:
        print(f"  {cluster:<24} {train[cluster]:>4} originals + {added[cluster]:>4} augmented")
    results = [o for o in storage.list_objects(dataset_url.replace("/datasets/", "/training/"), options) if o.relpath.endswith("/result.json")]
    if results:
        trained = json.loads(storage.read_bytes(results[-1].url, options))
        print(f"\n== training ({trained['model']}, {trained['world_size']} torch.distributed workers, {trained['device']}, amp {trained['amp']})")
        for epoch in trained.get("history", []):
            print(
                f"  epoch {epoch['epoch']}: train loss {epoch['train_loss']:.3f}  "
                f"val IoU {epoch['val_iou'] if epoch['val_iou'] is not None else float('nan'):.3f}"
            )
        print(f"  {trained.get('images_per_s') or 0:.1f} images/s; MLflow run {trained['mlflow_run_id']}")
        print(f"  model: {trained['model_url']}")
    print(f"\n  dataset:  {dataset_url}")
    print(f"  gallery:  {storage.join(dataset_url, 'augmented', 'gallery.jpg')}")
    print(f"  contact sheets: {storage.join(dataset_url, 'clusters')}/sheet-<n>.jpg")
    print(f"  raw/{batch}/ untouched; DAG log: {log_path}")
    return 1 if mismatches else 0


def run_demo(config: DemoConfig) -> int:
    """Run the demo end to end and print the results; returns the process exit status."""
    from tasks.synth import SynthConfig, generate_catalogue

    started = time.monotonic()
    print("== starting the embedded stack: moto S3, Airflow api-server (SQLite), MLflow (SQLite)")
    info = stack.up(airflow="api-server")
    env = {**os.environ, **stack.read_env_file()}
    options = storage.storage_options_from_env(env)
    bucket = info["bucket"]
    batch = f"demo-{config.seed}-{config.n}"
    batch_url = storage.join(f"s3://{bucket}", "raw", batch)
    log_path = stack.StackPaths(stack.default_state_dir()).logs / f"demo-{DAG_ID}.log"
    run = None
    try:
        print(f"== generating {config.n} products and {config.bad} bad inputs into {batch_url}")
        if storage.exists(storage.join(batch_url, "_READY"), options):
            print("   (batch already uploaded earlier; reusing it)")
        else:
            generate_catalogue(
                batch_url,
                SynthConfig(n=config.n, seed=config.seed, bad=config.bad, max_side=config.max_side),
                storage_options=options,
                progress=True,
            )
        conf = {
            "batch": batch,
            "bucket": bucket,
            "target_per_cluster": config.target_per_cluster,
            "seed": config.seed,
            "model": "u2netp",
            "epochs": config.epochs,
            "train_input_size": config.train_input_size,
            "batch_size": 8,
            "workers": 2,
        }
        print(f"== running {DAG_ID} with `airflow dags test` (sensor, cleaning, features, clusters, review gate, ...)")
        run = _start_dag_run(conf, env, log_path)
        user, password = next((u, p) for u, p in info["login"].items() if u == "reviewer")
        client = AirflowClient(info["airflow_url"], user, password)
        detail = _wait_for_review_or_exit(client, run, log_path)
        link = re.search(r"/bgremoval/review/([A-Za-z0-9_-]+)\?bucket=", detail["body"])
        version = link.group(1)
        print(f"== the run waits at the review gate: {detail['subject']}")
        print(f"   review page: {info['airflow_url']}/bgremoval/review/{version}?bucket={bucket}")
        print("== playing the reviewer through the review page's HTTP API (as a person's clicks would)")
        truth = _truth(batch_url, options)
        for line in play_reviewer(client, version, bucket, truth, config.max_moves) or ["nothing to correct"]:
            print(f"   {line}")
        client.answer(detail, "Approve")
        print("   approved in Airflow's REST API (PATCH .../hitlDetails, what Required Actions does)")
        if run.wait() != 0:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"`airflow dags test {DAG_ID}` failed (exit {run.returncode}); log {log_path}:\n{tail}")
        status = _print_results(f"s3://{bucket}/datasets/{version}", batch, truth, options, log_path)
        print(f"== done in {time.monotonic() - started:.0f} s")
        return status
    finally:
        if run is not None and run.poll() is None:
            run.terminate()
        if config.keep:
            print(f"stack left running; `source {info['env_file']}` to use it, `make down` to stop it")
        else:
            stack.down()
