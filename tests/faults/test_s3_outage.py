"""The S3 server restarted in the middle of a production shard: the task fails, it does not record
photos that were only unreachable as failed, and its retry, once the server is back, leaves what an
uninterrupted run leaves.

moto keeps its objects in memory, so the restarted server starts empty: the test puts the drop and
the shard list back (durable storage would still have held them) and compares the retry's outputs
with an uninterrupted run on a local copy of the same photos."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tasks.core import storage
from tasks.dev import stack
from tasks.dev.synth import SynthConfig, encode_jpeg, render_item
from tasks.feedback.production import ProductionConfig, plan_production, process_shard

pytestmark = pytest.mark.process

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BATCH = "d1"


def _start_moto(port: int, paths: stack.StackPaths) -> psutil.Process:
    proc = stack.start_process(paths, "moto", [stack.venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               dict(os.environ))
    stack.wait_http(f"http://127.0.0.1:{port}/moto-api/", 60, proc, paths.logs / "moto.log")
    return proc


def _put_drop(root: str, photos: dict[str, bytes], options: dict | None) -> str:
    for name, data in photos.items():
        storage.write_bytes(f"{root}/incoming/{BATCH}/{name}", data, options)
    return plan_production(root, BATCH, 100, options)["shard_urls"][0]


def _published_keys(root: str, options: dict | None) -> list[str]:
    storage.forget_listings(f"{root}/published/{BATCH}", options)  # another process writes there
    return [o.relpath for o in storage.list_objects(f"{root}/published/{BATCH}", options)]


def _published(root: str, options: dict | None) -> dict[str, str]:
    return {key: hashlib.sha256(storage.read_bytes(f"{root}/published/{BATCH}/{key}", options)).hexdigest()
            for key in _published_keys(root, options)}


def test_an_s3_restart_mid_shard_fails_the_task_and_its_retry_completes(tmp_path, write_model_folder, monkeypatch):
    port, paths = stack.free_port(), stack.StackPaths(tmp_path / "moto")
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in stack.stack_environment(stack.StackPaths(tmp_path / "stack"), port).items()
           if k.startswith("AWS_")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    options = storage.storage_options_from_env(env)
    photos = {f"p{i:02d}.jpg": encode_jpeg(render_item(i, SynthConfig(n=16, seed=21, max_side=220)).image)
              for i in range(16)}
    model = write_model_folder(tmp_path / "model")
    config = ProductionConfig(threshold=0.0, batch_size=2)

    reference = str(tmp_path / "reference")
    expected = process_shard(reference, BATCH, _put_drop(reference, photos, None), model, config)

    server = _start_moto(port, paths)
    try:
        stack.create_bucket(endpoint, "outage")
        shard = _put_drop("s3://outage", photos, options)
        script = textwrap.dedent(f"""
            from tasks.core import storage
            from tasks.feedback.production import ProductionConfig, process_shard
            process_shard("s3://outage", {BATCH!r}, {shard!r}, {model!r}, ProductionConfig(threshold=0.0, batch_size=2),
                          storage_options=storage.storage_options_from_env())
        """)
        task = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT)})
        deadline = time.monotonic() + 180
        while len([k for k in _published_keys("s3://outage", options) if k.endswith(".png")]) < 4:
            assert task.poll() is None, task.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the shard published nothing"
            time.sleep(0.1)
        stack.stop_process_tree(server, timeout=5)  # the S3 server goes away mid-shard
        started = time.monotonic()
        _, stderr = task.communicate(timeout=300)
        failed_after = time.monotonic() - started
        assert task.returncode != 0, "the task finished although S3 was gone"
        assert "Could not connect to the endpoint URL" in stderr or "ConnectionError" in stderr, stderr[-3000:]
        print(f"S3 restart mid-shard: the task failed {failed_after:.1f} s after the server went away "
              f"({stderr.strip().splitlines()[-1][:160]})")

        server = _start_moto(port, paths)  # back, empty: the drop and its shard list are put back
        stack.create_bucket(endpoint, "outage")
        assert _put_drop("s3://outage", photos, options) == shard
        retried = process_shard("s3://outage", BATCH, shard, model, config, storage_options=options)
        assert {k: retried[k] for k in ("published", "queued", "failed")} == \
            {k: expected[k] for k in ("published", "queued", "failed")} == {"published": 16, "queued": 0, "failed": 0}
        assert _published("s3://outage", options) == _published(reference, None)
    finally:
        stack.stop_process_tree(server, timeout=5)
