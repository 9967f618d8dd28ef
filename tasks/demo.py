"""``make demo``: the whole pipeline, as far as it is built, on a generated catalogue.

Starts the embedded stack, uploads a synthetic catalogue with bad inputs to the local S3, runs the
``bgremoval_training`` DAG with ``airflow dags test`` (the real scheduler code path, one process),
then reads the results back from S3 and prints them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass

from tasks import stack, storage


@dataclass(frozen=True)
class DemoConfig:
    """What the demo generates and whether it leaves the stack running."""

    n: int = 120
    bad: int = 26
    seed: int = 7
    max_side: int = 800
    keep: bool = False


def _run_dag(dag_id: str, conf: dict, env: dict[str, str], log_path) -> None:
    argv = [stack.venv_bin("airflow"), "dags", "test", dag_id, "--conf", json.dumps(conf)]
    with open(log_path, "wb") as log:
        result = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=stack.PROJECT_ROOT)
    if result.returncode != 0:
        tail = open(log_path, errors="replace").read()[-4000:]
        raise RuntimeError(f"`airflow dags test {dag_id}` failed (exit {result.returncode}); log {log_path}:\n{tail}")


def _check_expected(truth_url: str, manifest, options: dict) -> tuple[int, list[str]]:
    """Compare quarantine reasons with what the generator intended; return (matched, mismatches)."""
    import io

    import pandas as pd

    truth = pd.read_csv(io.BytesIO(storage.read_bytes(truth_url, options)), keep_default_na=False)
    bad = truth[truth["expected_reason"] != ""]
    matched, mismatches = 0, []
    for row in bad.itertuples():
        seen = set(manifest.loc[manifest["stem"].str.contains(row.stem, regex=False), "reason"].dropna())
        if row.expected_reason in seen:
            matched += 1
        else:
            mismatches.append(f"{row.stem}: expected {row.expected_reason}, got {sorted(seen) or 'nothing'}")
    return matched, mismatches


def run_demo(config: DemoConfig) -> int:
    """Run the demo end to end and print the results; returns the process exit status."""
    from tasks.manifest import read_table
    from tasks.synth import SynthConfig, generate_catalogue

    started = time.monotonic()
    print("== starting the embedded stack (moto S3, Airflow on SQLite, MLflow on SQLite)")
    info = stack.up()
    env = {**os.environ, **stack.read_env_file()}
    options = storage.storage_options_from_env(env)
    bucket_url = f"s3://{info['bucket']}"
    batch = f"demo-{config.seed}-{config.n}"
    batch_url = storage.join(bucket_url, "raw", batch)
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
        print("== running DAG bgremoval_training with `airflow dags test` (sensor -> plan -> mapped cleaning -> finalize)")
        log_path = stack.StackPaths(stack.default_state_dir()).logs / "demo-bgremoval_training.log"
        _run_dag("bgremoval_training", {"batch": batch, "bucket": info["bucket"]}, env, log_path)

        summaries = [
            o for o in storage.list_objects(storage.join(bucket_url, "datasets"), options)
            if o.relpath.startswith(f"{batch}-") and o.relpath.endswith("/summary.json")
        ]
        summary = json.loads(storage.read_bytes(summaries[-1].url, options))
        manifest = read_table(summary["manifest_url"], options)
        matched, mismatches = _check_expected(storage.join(batch_url, "truth.csv"), manifest, options)
        from tasks.ingest import format_summary

        print()
        print(format_summary(summary))
        conversions = Counter(
            c for value in manifest.loc[manifest["status"] == "ok", "conversions"].dropna() for c in value.split(",") if c
        )
        if conversions:
            print("  converted and kept:")
            for name, count in sorted(conversions.items()):
                print(f"    {name:<32}{count:>4}")
        print(f"  bad inputs quarantined with the intended reason: {matched}/{matched + len(mismatches)}")
        for line in mismatches:
            print(f"    MISMATCH {line}")
        print(f"  manifest:   {summary['manifest_url']}")
        print(f"  quarantine: {summary['quarantine_url']}")
        print(f"  raw/{batch}/ untouched; DAG log: {log_path}")
        print(f"== done in {time.monotonic() - started:.0f} s")
        return 1 if mismatches else 0
    finally:
        if config.keep:
            print(f"stack left running; `source {info['env_file']}` to use it, `make down` to stop it")
        else:
            stack.down()
