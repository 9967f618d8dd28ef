"""Shared fixtures: real servers on loopback (moto S3) and an Airflow home on SQLite.

The Airflow environment is set here, before any test imports Airflow, so every test process
gets a private AIRFLOW_HOME under a temporary folder, examples off and parallelism 4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tasks.dev import stack

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_STATE = Path(tempfile.mkdtemp(prefix="bgremoval-tests-"))
_AIRFLOW_HOME = _STATE / "airflow"

AIRFLOW_ENV = {
    **stack.airflow_environment(_AIRFLOW_HOME),
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    "AIRFLOW__BGREMOVAL__BUCKETS": "t-*",
    "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,  # shared by every api-server of the session  # the pages serve the tests' fresh buckets (s3_bucket)
    "BGREMOVAL_STATE": str(_STATE / "stack"),
    "MLFLOW_TRACKING_URI": f"sqlite:///{_STATE / 'mlflow.db'}",
    "BGREMOVAL_MLFLOW_ARTIFACTS": str(_STATE / "mlflow-artifacts"),
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,reviewer:user,viewer:viewer",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(_AIRFLOW_HOME / "passwords.json"),
}
PASSWORDS = {"admin": "admin-password", "reviewer": "reviewer-password", "viewer": "viewer-password"}
os.environ.update(AIRFLOW_ENV)
_AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
(_AIRFLOW_HOME / "passwords.json").write_text(json.dumps(PASSWORDS))
sys.path.insert(0, str(PROJECT_ROOT / "plugins"))


#: Fixtures that start a server or another process: a test that uses one is a ``process`` test.
PROCESS_FIXTURES = frozenset({"moto_endpoint", "s3_bucket", "airflow_db", "run_dag", "api_server", "second_api_server", "reviewer", "client_for",
                              "browser", "project_wheel", "uv", "tool"})


def uv_environment() -> dict[str, str]:
    """The environment for ``uv`` and for a fresh virtual environment's processes: no PYTHONPATH or
    VIRTUAL_ENV of this one; a pip index set in the environment passed on, as scripts/install.sh does."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if env.get("PIP_INDEX_URL") and not (env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL")):
        env["UV_DEFAULT_INDEX"] = env["PIP_INDEX_URL"]
    return env


def skip_or_fail(reason: str) -> None:
    """Skip the calling test because ``reason`` (something it needs is missing); fail it instead
    under ``CI=true``, where everything must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, how: str) -> str:
    """The console script ``name`` of this venv, else from PATH (:func:`tasks.dev.stack.venv_bin`);
    :func:`skip_or_fail` saying ``how`` to get it when there is none."""
    try:
        return stack.venv_bin(name)
    except FileNotFoundError:
        skip_or_fail(f"{name} is missing ({how})")


@pytest.fixture(scope="session")
def tool():
    """``tool(name, how)``: :func:`require_tool` for test modules (they cannot import conftest)."""
    return require_tool


@pytest.fixture(scope="session")
def uv() -> tuple[str, dict[str, str]]:
    """``(uv executable, environment for it and for fresh virtual environments' processes)``."""
    return require_tool("uv", "scripts/install.sh installs it"), uv_environment()


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built by ``uv build`` from a copy of the checkout (building in the
    checkout would leave build/ there): what a user installs and what a Databricks cluster gets."""
    uv = require_tool("uv", "scripts/install.sh installs it")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(PROJECT_ROOT / "tasks", source / "tasks", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    done = subprocess.run([uv, "build", "--wheel", "--quiet", "--out-dir", str(work / "dist"), str(source)],
                          capture_output=True, text=True, env=uv_environment(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (work / "dist").glob("bgremoval-*.whl")
    return wheel


def pytest_collection_modifyitems(config, items):
    """Give every test one tier: ``integration`` (marked: whole pipelines on real servers),
    ``process`` (marked: it trains or exports a real model, or starts a process; or it uses a
    fixture that starts a server) or ``unit`` (the rest: in-process, no server, seconds at most;
    ``make test-fast`` runs these). Tests that run a DAG in this process time out by
    :func:`_timeout_by_thread`."""
    for item in items:
        if "airflow_db" in getattr(item, "fixturenames", ()):
            _timeout_by_thread(item)
        if item.get_closest_marker("integration") or item.get_closest_marker("process"):
            continue
        callspec = getattr(item, "callspec", None)
        on_s3 = callspec is not None and "s3" in callspec.params.values()  # a storage fixture parametrised on moto
        if on_s3 or PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.process)
        else:
            item.add_marker(pytest.mark.unit)


def _timeout_by_thread(item) -> None:
    """Keep the test's timeout (its marker's, else ``pyproject.toml``'s) but enforce it with
    pytest-timeout's thread method. ``dag.test()`` runs each task under Airflow's own SIGALRM
    timer, which replaces the signal method's handler: a run stuck there (a review nobody answers)
    would never time out and would hold its worker until CI's limit. The thread method prints every
    thread's stack and ends the worker process; xdist reports the test as crashed and goes on."""
    marker = item.get_closest_marker("timeout")
    seconds = None
    if marker is not None:
        seconds = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    item.add_marker(pytest.mark.timeout(seconds or float(item.config.getini("timeout")), method="thread"), append=False)


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_of_the_session():
    """Give MLflow's process-wide tracking URI back to the session's store after each test: code
    under test may point it elsewhere (``train`` with ``mlflow_tracking_uri``), and a later test
    in the same process must not register into that store."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or AIRFLOW_ENV["MLFLOW_TRACKING_URI"])


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real ``moto_server`` on a free loopback port for the whole session; yields its URL."""
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
    from tasks.core import storage

    env = moto_connection_env(moto_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    options = storage.storage_options_from_env(env)
    stack.create_bucket(moto_endpoint, bucket)
    yield f"s3://{bucket}", options


@pytest.fixture(params=["local", "s3"])
def bucket(request, tmp_path):
    """``(bucket_url, storage_options)`` of an empty bucket: a local folder, then one on moto."""
    if request.param == "local":
        return str(tmp_path / "bucket"), None
    return request.getfixturevalue("s3_bucket")


@pytest.fixture(scope="session")
def published() -> Path:
    """The published ``u2netp.onnx`` (the install step fetches it); skips without it, fails in CI."""
    from tasks.model.published import find_pretrained_onnx

    path = find_pretrained_onnx()
    if path is None:
        skip_or_fail("the published u2netp.onnx is not on this machine (the install step runs `bgremoval pretrained fetch`)")
    return path


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate the session's SQLite Airflow metadata database once; yields AIRFLOW_HOME."""
    result = subprocess.run(
        [stack.venv_bin("airflow"), "db", "migrate"], env=dict(os.environ), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield _AIRFLOW_HOME


@pytest.fixture(scope="session")
def run_dag(airflow_db):
    """``run_dag(dag_id, conf)``: one run of the DAG in ``dags/<dag_id>.py`` with ``conf``, by
    ``dag.test()`` in this process; returns the finished DagRun. It is what ``airflow dags test``
    does without starting another Python and Airflow for each run (that costs about 15 s of CPU a run
    on 2 cores: the imports and the task execution API's routes, built once per process). Task output
    goes to this process's stdout (``capfd``)."""
    from airflow.dag_processing.dagbag import DagBag

    def run(dag_id: str, conf: dict):
        bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / f"{dag_id}.py"))
        assert bag.import_errors == {}, bag.import_errors
        return bag.dags[dag_id].test(run_conf=conf)

    return run


def moto_connection_env(endpoint: str) -> dict[str, str]:
    """Environment variables that point boto, the CLI and ``aws_default`` at a moto endpoint."""
    env = stack.stack_environment(stack.StackPaths(_STATE / "stack"), int(endpoint.rsplit(":", 1)[1]))
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AIRFLOW_CONN_AWS_DEFAULT")
    return {k: env[k] for k in keys}


def _api_server(moto_endpoint: str, state: Path):
    """Start ``airflow api-server`` on a free port against the session's metadata DB and moto;
    returns ``(process, base URL)`` once it answers."""
    port = stack.free_port()
    env = {
        **os.environ,
        **moto_connection_env(moto_endpoint),
        **stack.api_server_environment(port),
    }
    paths = stack.StackPaths(state)
    proc = stack.start_process(paths, "api-server", [stack.venv_bin("airflow"), "api-server", "--port", str(port)], env)
    base = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{base}/api/v2/monitor/health", 180, proc, paths.logs / "api-server.log")
    except BaseException:
        stack.stop_process_tree(proc)
        raise
    return proc, base


@pytest.fixture(scope="session")
def api_server(airflow_db, moto_endpoint):
    """``airflow api-server`` (REST API, UI and the review plugin) on the session's metadata DB.

    Yields its base URL. No scheduler runs: DAG runs are executed by ``airflow dags test``.
    """
    proc, base = _api_server(moto_endpoint, _STATE / "api")
    try:
        yield base
    finally:
        stack.stop_process_tree(proc)


@pytest.fixture(scope="session")
def second_api_server(api_server, moto_endpoint):
    """Another api-server process on the same database and S3 (a deployment runs several); tokens
    of one are valid on the other (one JWT secret)."""
    proc, base = _api_server(moto_endpoint, _STATE / "api-2")
    try:
        yield base
    finally:
        stack.stop_process_tree(proc)


@pytest.fixture()
def reviewer(api_server):
    """A :class:`tasks.dev.airflow_client.AirflowClient` logged in as the reviewer."""
    from tasks.dev.airflow_client import AirflowClient

    return AirflowClient(api_server, "reviewer", PASSWORDS["reviewer"])


@pytest.fixture()
def client_for(api_server):
    """Factory: ``client_for("viewer")``, or ``client_for(None)`` for an anonymous client."""
    from tasks.dev.airflow_client import AirflowClient

    return lambda user: AirflowClient(api_server, user, PASSWORDS.get(user))


@pytest.fixture()
def passwords():
    """The test users' passwords (the simple auth manager reads them from the passwords file)."""
    return dict(PASSWORDS)


#: Channel widths of a tiny U2-Net: the real architecture, a forward pass takes milliseconds.
TINY_WIDTHS = {"encoder": [[4, 8]] * 6, "decoder": [[4, 8]] * 5}


@pytest.fixture(scope="session")
def write_model_folder():
    """``write_model_folder(folder, seed=0, input_size=32, widths=TINY_WIDTHS, history=False)``:
    write an untrained model as training does (``model.pt`` state dict + ``config.json``, and with
    ``history`` a three-epoch ``result.json``); ``widths=None`` writes a full U2-NetP. Returns the
    folder as a string."""
    import torch

    from tasks.model.u2net import U2Net, build_model
    from tasks.train.config import TrainConfig

    def write(folder, seed: int = 0, input_size: int = 32, widths: dict | None = TINY_WIDTHS,
              history: bool = False) -> str:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        if widths is None:
            model = build_model("u2netp")
        else:
            model = U2Net(TrainConfig(dataset_url="-", output_url="-", model_widths=widths).model_config())
        torch.save(model.state_dict(), folder / "model.pt")
        config = {"model": "u2netp", "model_widths": widths, "input_size": input_size, "resize": "stretch"}
        (folder / "config.json").write_text(json.dumps(config))
        if history:
            epochs = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_iou": 0.5 + e / 10} for e in (1, 2, 3)]
            (folder / "result.json").write_text(json.dumps({"history": epochs}))
        return str(folder)

    return write


@pytest.fixture(scope="session")
def private_mlflow():
    """``with private_mlflow(folder, experiment) as run_id:`` point MLflow (and MLFLOW_TRACKING_URI)
    at an SQLite store in ``folder`` with one empty run in ``experiment``; restores the session's
    store afterwards."""
    import contextlib

    import mlflow

    @contextlib.contextmanager
    def store(folder, experiment: str = "tests"):
        uri = f"sqlite:///{folder}/mlflow.db"
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        try:
            experiment_id = mlflow.create_experiment(experiment, artifact_location=str(Path(folder) / "artifacts"))
            with mlflow.start_run(experiment_id=experiment_id) as run:
                pass
            yield run.info.run_id
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved
            mlflow.set_tracking_uri(saved or "")

    return store
