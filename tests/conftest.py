"""Shared fixtures: real servers on loopback (moto S3) and an Airflow home on SQLite.

The Airflow environment is set here, before any test imports Airflow, so every test process
gets a private AIRFLOW_HOME under a temporary folder, examples off and parallelism 4.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_STATE = Path(tempfile.mkdtemp(prefix="bgremoval-tests-"))
_AIRFLOW_HOME = _STATE / "airflow"

AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
    "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    "BGREMOVAL_STATE": str(_STATE / "stack"),
}
os.environ.update(AIRFLOW_ENV)
_AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(PROJECT_ROOT / "plugins"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real ``moto_server`` on a free loopback port for the whole session; yields its URL."""
    from tasks import stack

    port = stack.free_port()
    paths = stack.StackPaths(_STATE / "moto")
    proc = stack.start_process(paths, "moto", [stack.venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ))
    endpoint = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{endpoint}/moto-api/", 60, proc, paths.logs / "moto.log")
        yield endpoint
    finally:
        stack.stop_process_tree(proc)


@pytest.fixture()
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server; yields ``(bucket_url, storage_options)``.

    Also points the environment (boto, the CLI and Airflow's ``aws_default`` connection) at it.
    """
    from tasks import stack, storage

    env = stack.stack_environment(stack.StackPaths(_STATE / "stack"), int(moto_endpoint.rsplit(":", 1)[1]))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AIRFLOW_CONN_AWS_DEFAULT"):
        monkeypatch.setenv(key, env[key])
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    options = storage.storage_options_from_env(env)
    stack.create_bucket(moto_endpoint, bucket)
    yield f"s3://{bucket}", options


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate the session's SQLite Airflow metadata database once; yields AIRFLOW_HOME."""
    from tasks import stack

    result = subprocess.run(
        [stack.venv_bin("airflow"), "db", "migrate"], env=dict(os.environ), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield _AIRFLOW_HOME
