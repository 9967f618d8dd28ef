"""A task process killed with SIGKILL half-way through a shard, then retried, leaves exactly what an
uninterrupted run leaves: the same files with the same bytes, nothing duplicated, nothing lost.

The shard runs in a child process (as an Airflow task does); the test kills it once some of its
outputs exist, runs the shard again (the retry) and compares everything under the outputs with a
run that was never interrupted, on a copy of the same inputs."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.core import storage
from tasks.data.config import CleaningConfig
from tasks.data.ingest import clean_shard, plan_batch
from tasks.dev.synth import SynthConfig, generate_catalogue

pytestmark = pytest.mark.process

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG = CleaningConfig(working_size=96)


def contents(root: Path) -> dict[str, str]:
    """Every file below ``root`` (relative path → sha256) but the plan's tables (``_work/``: they hold
    absolute URLs, see :func:`results`) and temporary write keys (``.tmp-*``: a write killed half-way leaves one, and every reader
    skips them, :func:`tasks.core.storage.list_objects`)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not str(p.relative_to(root)).startswith("_work/") and ".tmp-" not in p.name}


def results(dataset_url: str) -> list[dict]:
    """The shard's result table with every URL made relative to the dataset."""
    from tasks.core.manifest import read_table

    [table] = [read_table(o.url) for o in storage.list_objects(storage.join(dataset_url, "_work", "results"))]
    table = table.astype(object).where(table.notna(), None)
    return [{k: (v.replace(dataset_url, "") if isinstance(v, str) else v) for k, v in row.items()
             if k not in ("image_source", "mask_source")} for row in table.to_dict("records")]


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the task ended before it could be killed"
        assert time.monotonic() < deadline, "the task made no progress"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    generate_catalogue(str(root / "raw" / "b1"), SynthConfig(n=60, bad=0, seed=4, max_side=200))
    return root


def plan(root: Path) -> dict:
    return plan_batch(str(root), "b1", CONFIG, shard_size=1000)


def test_clean_shard_killed_half_way_then_retried_leaves_what_an_uninterrupted_run_leaves(batch, tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(batch, reference)
    shutil.copytree(batch, interrupted)
    expected = plan(reference)
    clean_shard(expected["shard_urls"][0], expected["dataset_url"], "b1", CONFIG, io_threads=1)

    got = plan(interrupted)
    images = Path(got["dataset_url"]) / "clean" / "images"
    script = textwrap.dedent(f"""
        from tasks.data.config import CleaningConfig
        from tasks.data.ingest import clean_shard
        clean_shard({got["shard_urls"][0]!r}, {got["dataset_url"]!r}, "b1", CleaningConfig(working_size=96), io_threads=1)
    """)
    task = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT)
    kill_when(task, lambda: images.exists() and len(list(images.iterdir())) >= 20)
    assert task.returncode == -signal.SIGKILL
    assert not (Path(got["dataset_url"]) / "_work" / "results").exists()  # it died before its result table

    clean_shard(got["shard_urls"][0], got["dataset_url"], "b1", CONFIG, io_threads=1)  # the retry
    assert contents(Path(got["dataset_url"])) == contents(Path(expected["dataset_url"]))
    assert results(got["dataset_url"]) == results(expected["dataset_url"])
    assert len(results(got["dataset_url"])) == 60


def drop_of(root: Path, n: int = 40) -> None:
    from tasks.dev.synth import encode_jpeg, render_item

    config = SynthConfig(n=n, seed=6, max_side=160)
    for i in range(n):
        storage.write_bytes(str(root / "incoming" / "d1" / f"p{i:02d}.jpg"), encode_jpeg(render_item(i, config).image))


def production_outputs(root: Path) -> dict:
    """What a production shard leaves, without its timestamps: published files (bytes), the queue's
    and the pool's items (ids, and the bytes of their pictures), the failed list."""
    def pictures(folder: Path) -> dict[str, str]:
        return {k: v for k, v in contents(folder).items() if not k.endswith(".json")} if folder.exists() else {}

    return {"published": contents(root / "published"), "queue": pictures(root / "corrections" / "queue"),
            "pool": pictures(root / "retraining-pool"),
            "failed": sorted(contents(root / "production" / "d1" / "failed")) if (root / "production").exists() else []}


def test_cut_out_shard_killed_half_way_then_retried_leaves_what_an_uninterrupted_run_leaves(
        tmp_path, write_model_folder):
    from tasks.feedback.production import ProductionConfig, plan_production, process_shard

    model = write_model_folder(tmp_path / "model")
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    drop_of(reference)
    shutil.copytree(reference, interrupted)
    probe = process_shard(str(tmp_path / "probe"), "d1", plan_production(str(reference), "d1", 100)["shard_urls"][0],
                          model, ProductionConfig(threshold=0.0))
    threshold = sorted(probe["scores"])[len(probe["scores"]) // 2]  # half published, half queued
    config = ProductionConfig(threshold=threshold, batch_size=2)
    expected = process_shard(str(reference), "d1", plan_production(str(reference), "d1", 100)["shard_urls"][0],
                             model, config)
    assert expected["published"] and expected["queued"]

    shard = plan_production(str(interrupted), "d1", 100)["shard_urls"][0]
    script = textwrap.dedent(f"""
        from tasks.feedback.production import ProductionConfig, process_shard
        process_shard({str(interrupted)!r}, "d1", {shard!r}, {model!r}, ProductionConfig(threshold={threshold!r}, batch_size=2))
    """)
    task = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT)
    published = interrupted / "published" / "d1"
    kill_when(task, lambda: published.exists() and len(list(published.glob("*.png"))) >= 5)
    assert task.returncode == -signal.SIGKILL

    retried = process_shard(str(interrupted), "d1", shard, model, config)
    assert {k: retried[k] for k in ("published", "queued", "failed")} == \
        {k: expected[k] for k in ("published", "queued", "failed")}
    assert production_outputs(interrupted) == production_outputs(reference)
