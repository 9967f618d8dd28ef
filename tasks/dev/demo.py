"""``make demo``: the whole pipeline on a generated catalogue, from the S3 sensor to production.

Starts the embedded stack (moto S3, Airflow's api-server on SQLite, MLflow on SQLite), uploads a
synthetic catalogue with bad inputs, and runs ``bgremoval_training`` with ``airflow dags test``.
When the run stops at the review gate, the demo plays the reviewer through the same HTTP APIs a
person's clicks use: it reads the proposed clusters from the review page's API, moves images whose
product type it knows from the generator's truth file, and approves in Airflow's REST API. The run
fine-tunes the published U2-NetP weights (or the champion of an earlier demo), evaluates against
the champion, passes the production gate and promotes. Then a drop of new photos goes through ``bgremoval_inference``: published
or queued for correction. Every stage's results are printed.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from tasks import registry
from tasks.core import layout, storage
from tasks.dev import stack, stack_env
from tasks.dev.config import DemoConfig
from tasks.dev.airflow_client import AirflowClient
from tasks.model.refine_choice import load_refine_choice

DAG_ID = "bgremoval_training"
INFERENCE_DAG_ID = "bgremoval_inference"
#: The demo's model learns from generated photos, so it is registered apart from the model that
#: ``bgremoval remove`` and the DAGs use by default (``registry.DEFAULT_MODEL_NAME``): under that
#: name its champion would cut out a user's real photos after ``make demo``, worse than the
#: published weights it started from.
REGISTERED_MODEL = f"{registry.DEFAULT_MODEL_NAME}-demo"


def _start_dag_run(conf: dict, env: dict[str, str], log_path: Path, dag_id: str = DAG_ID) -> subprocess.Popen:
    argv = [stack.venv_bin("airflow"), "dags", "test", dag_id, "--conf", json.dumps(conf)]
    log = open(log_path, "wb")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=stack_env.PROJECT_ROOT)


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

    truth = pd.read_csv(io.BytesIO(storage.read_bytes(layout.batch_truth(batch_url), options)), keep_default_na=False)
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


def _print_results(bucket_url: str, version: str, batch: str, truth, options: dict, log_path: Path) -> int:
    from tasks.data.ingest import format_summary
    from tasks.core.manifest import read_table
    from tasks.data.splits import format_split_summary, split_summary

    dataset_url = layout.dataset(bucket_url, version)
    summary = json.loads(storage.read_bytes(layout.dataset_summary(dataset_url), options))
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

    augmented = read_table(layout.manifest(layout.augmented(dataset_url)), options)
    train = ok[ok["split"] == "train"]["cluster"].value_counts()
    added = augmented["cluster"].value_counts().reindex(train.index, fill_value=0)
    print("\n== augmentation (train split, rare clusters topped up)")
    for cluster in train.index:
        print(f"  {cluster:<24} {train[cluster]:>4} originals + {added[cluster]:>4} augmented")
    results = [o for o in storage.list_objects(layout.training_runs(bucket_url, version), options) if o.relpath.endswith("/result.json")]
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
        _print_evaluation(trained["output_url"], options)
    print(f"\n  dataset:  {dataset_url}")
    print(f"  gallery:  {storage.join(dataset_url, 'augmented', 'gallery.jpg')}")
    print(f"  contact sheets: {storage.join(dataset_url, 'clusters')}/sheet-<n>.jpg")
    print(f"  raw/{batch}/ untouched; DAG log: {log_path}")
    return 1 if mismatches else 0


def _print_evaluation(run_url: str, options: dict) -> None:
    """The evaluation table, the gate's verdict, the calibrated routing and the registry state."""
    from tasks import registry

    assessment_url = storage.join(run_url, "report", "assessment.json")
    if not storage.exists(assessment_url, options):
        print("\n== evaluation: no report (the run did not reach evaluate_model)")
        return
    assessment = json.loads(storage.read_bytes(assessment_url, options))
    print(f"\n== evaluation on the test split (at each photo's own resolution)\n{assessment['table']}")
    champion = assessment.get("champion")
    if champion:
        print(f"  champion (version {champion['version']}) on the same split: mean IoU {champion['mean_iou'] * 100:.3f} %")
    print(assessment["verdict"])
    print(f"  report: {assessment['report_html']} (also in the MLflow run under report/)")
    quality_url = storage.join(run_url, "quality.json")
    if storage.exists(quality_url, options):
        quality = json.loads(storage.read_bytes(quality_url, options))
        report = quality["report"]
        if quality.get("note"):
            print(f"  production quality threshold {quality['threshold']:.3f}: {quality['note']}")
        else:
            print(f"  production quality threshold {quality['threshold']:.3f}, calibrated on val to route images below "
                  f"{quality['target_iou'] * 100:g} % IoU: recall {report['recall']:.2f}, precision {report['precision']:.2f}")
    choice = load_refine_choice(run_url, options)
    if choice is not None:
        print(f"  edge refinement: {choice.describe()}")
    version = registry.alias_version(REGISTERED_MODEL, registry.CHAMPION)
    if version is None:
        print(f"  registry: {REGISTERED_MODEL} has no champion: nothing was promoted")
        return
    previous = registry.alias_version(REGISTERED_MODEL, registry.PREVIOUS)
    print(f"  registry: {REGISTERED_MODEL} champion = version {version}, previous = {previous or 'none'} "
          f"(`bgremoval model rollback --name {REGISTERED_MODEL}` restores the previous one)")
    print(f"  `bgremoval remove` without --model still uses {registry.DEFAULT_MODEL_NAME}'s champion, else the "
          f"published weights: this model learned from generated photos (`--model models:/{REGISTERED_MODEL}"
          "@champion` runs it)")


def _production_pass(config: DemoConfig, bucket: str, env: dict[str, str], options: dict, logs: Path,
                     airflow_url: str) -> None:
    """Drop new photos into incoming/, run bgremoval_inference, print where they went."""
    from tasks.feedback.queue import list_queue
    from tasks.core.codecs import encode_jpeg
    from tasks.dev.synth import SynthConfig, render_item

    drop = f"demo-drop-{config.seed}"
    incoming = layout.incoming(layout.bucket_url(bucket), drop)
    print(f"\n== production: {config.drop} new product photos into {incoming}/, then {INFERENCE_DAG_ID}")
    photos = SynthConfig(n=config.drop, seed=config.seed + 1000, max_side=config.max_side)
    for i in range(config.drop):
        storage.write_bytes(f"{incoming}/new-{i:03d}.jpg", encode_jpeg(render_item(i, photos).image), options)
    storage.write_bytes(layout.ready_marker(incoming), b"", options)
    log_path = logs / f"demo-{INFERENCE_DAG_ID}.log"
    run = _start_dag_run({"batch": drop, "bucket": bucket, "registered_model": REGISTERED_MODEL}, env, log_path,
                         INFERENCE_DAG_ID)
    if run.wait() != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"`airflow dags test {INFERENCE_DAG_ID}` failed (exit {run.returncode}); log {log_path}:\n{tail}")
    published = [o for o in storage.list_objects(layout.published(layout.bucket_url(bucket), drop), options)
                 if o.relpath.startswith("new-") and o.relpath.endswith(".png")]
    queued = [q for q in list_queue(layout.bucket_url(bucket), options) if q["batch"] == drop]
    print(f"  published {len(published)} (s3://{bucket}/published/{drop}/: RGBA PNG + JPEG on white + mask; "
          "the pairs joined retraining-pool/)")
    print(f"  queued for correction {len(queued)}: {airflow_url}/bgremoval/corrections?bucket={bucket}")
    print(f"  DAG log: {log_path}")


def run_demo(config: DemoConfig) -> int:
    """Run the demo end to end and print the results; returns the process exit status."""
    from tasks.dev.synth import SynthConfig, generate_catalogue

    started = time.monotonic()
    print("== starting the embedded stack: moto S3, Airflow api-server (SQLite), MLflow (SQLite)")
    info = stack.up(airflow="api-server")
    env = {**os.environ, **stack_env.read_env_file()}
    options = storage.storage_options_from_env(env)
    bucket = info["bucket"]
    batch = f"demo-{config.seed}-{config.n}"
    batch_url = layout.raw_batch(layout.bucket_url(bucket), batch)
    log_path = stack_env.StackPaths(stack_env.default_state_dir()).logs / f"demo-{DAG_ID}.log"
    run = None
    try:
        print(f"== generating {config.n} products and {config.bad} bad inputs into {batch_url}")
        if storage.exists(layout.ready_marker(batch_url), options):
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
            "max_steps_per_epoch": config.max_steps_per_epoch,
            "train_input_size": config.train_input_size,
            "learning_rate": config.learning_rate,
            "batch_size": 8,
            "workers": 2,
            "init_from": "auto",
            "registered_model": REGISTERED_MODEL,
        }
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        print(f"== running {DAG_ID} with `airflow dags test` (sensor, cleaning, features, clusters, review gate, ...)")
        print(f"   fine-tuning U2-NetP for {config.epochs} epoch(s) of {config.max_steps_per_epoch} step(s) x 2 workers x 8 "
              f"images at {config.train_input_size} px from the champion, or "
              "from the published weights when there is none; the production gate: mean IoU ≥ 97 %, every "
              "cluster ≥ 95 %, at most 0.2 points below the champion")
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
        status = _print_results(layout.bucket_url(bucket), version, batch, truth, options, log_path)
        from tasks import registry

        if registry.alias_version(REGISTERED_MODEL, registry.CHAMPION) is not None:
            _production_pass(config, bucket, env, options, log_path.parent, info["airflow_url"])
        else:
            print("\n== production skipped: no champion model (the gate did not pass)")
            status = 1  # the demo exists to show a model through the production gate
        print(f"== done in {time.monotonic() - started:.0f} s")
        return status
    finally:
        if run is not None and run.poll() is None:
            run.terminate()
        if config.keep:
            state = stack_env.default_state_dir()
            prefix = f"BGREMOVAL_STATE={state} " if os.environ.get("BGREMOVAL_STATE") else ""
            print(f"stack left running (S3, MLflow, the Airflow api-server: runs go through `airflow dags test`); "
                  f"`source {info['env_file']}` to use it, `{prefix}make up` for the scheduler too (the drops and "
                  f"retraining DAGs; AIRFLOW__BGREMOVAL__REGISTERED_MODEL={REGISTERED_MODEL} makes them use this "
                  f"model), `{prefix}make down` to stop it")
        else:
            stack.down()
