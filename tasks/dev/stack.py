"""The embedded stack: moto S3, an Airflow home on SQLite and an MLflow SQLite store, on loopback.

``bgremoval stack up`` starts what is needed on free ports and writes everything a shell or a
subprocess needs into ``<state>/stack.env``; ``bgremoval stack down`` stops every process it
started, by PID, also after a crash (the PID files survive it). ``<state>`` is ``.bgremoval/`` in
the project root unless ``BGREMOVAL_STATE`` says otherwise; it is git-ignored.

No Airflow import here: the stack runs Airflow as subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from tasks.dev.stack_env import PROJECT_ROOT, StackPaths, default_state_dir

DEFAULT_BUCKET = "bgremoval"
S3_KEY = "bgremoval-local"
S3_SECRET = "bgremoval-local-secret"
S3_REGION = "us-east-1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def venv_bin(name: str) -> str:
    """Path of console script ``name`` next to the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name!r} not found next to {sys.executable} or on PATH; run `make install`")
    return found


# ------------------------------------------------------------------------------ process bookkeeping


def _write_pid(paths: StackPaths, name: str, proc: psutil.Process) -> None:
    paths.pids.mkdir(parents=True, exist_ok=True)
    (paths.pids / f"{name}.pid").write_text(json.dumps({"pid": proc.pid, "create_time": proc.create_time()}))


def _recorded_process(pid_file: Path) -> psutil.Process | None:
    """Return the process a PID file names, or None when it is gone or the PID was reused."""
    try:
        record = json.loads(pid_file.read_text())
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["create_time"])) > 1.0:
            return None
        return proc if _alive(proc) else None
    except (FileNotFoundError, ValueError, KeyError, psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive


def stop_process_tree(proc: psutil.Process, timeout: float = 20.0) -> None:
    """SIGTERM the children of ``proc`` first, then ``proc``; SIGKILL whatever outlives ``timeout``."""
    try:
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for group in (children, [proc]):
        for p in group:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        for p in _wait_gone(group, timeout / 2):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _wait_gone(group, timeout / 2)
    try:
        proc.wait(timeout=1)  # reap it when it is our own child
    except (psutil.TimeoutExpired, psutil.NoSuchProcess, ChildProcessError):
        pass


def start_process(paths: StackPaths, name: str, argv: list[str], env: dict[str, str]) -> psutil.Process:
    """Start ``argv`` in its own session, log to ``logs/<name>.log``, record its PID; return it."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = open(paths.logs / f"{name}.log", "ab")
    popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=PROJECT_ROOT)
    log.close()
    proc = psutil.Process(popen.pid)
    _write_pid(paths, name, proc)
    return proc


def wait_http(url: str, timeout: float, proc: psutil.Process | subprocess.Popen | None = None,
              log_file: Path | None = None, status: int | None = None) -> None:
    """Wait until ``url`` answers HTTP (with ``status`` when given, e.g. 200 once a model is loaded;
    any answer otherwise); raise with the log's tail if ``proc`` dies first, ``TimeoutError`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not (proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_running()):
            tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"process for {url} exited early:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if status is None or response.status == status:
                    return
        except urllib.error.HTTPError as error:
            if status is None or error.code == status:
                return  # the server answers, even if not with 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer{f' {status}' if status else ''} within {timeout:.0f} s")


# ------------------------------------------------------------------------------ environment


def stack_environment(paths: StackPaths, s3_port: int, api_port: int | None = None, bucket: str = DEFAULT_BUCKET) -> dict[str, str]:
    """Return the environment variables that point Airflow, MLflow, the CLI and boto at the stack."""
    endpoint = f"http://127.0.0.1:{s3_port}"
    aws_conn = {
        "conn_type": "aws",
        "login": S3_KEY,
        "password": S3_SECRET,
        "extra": {"endpoint_url": endpoint, "region_name": S3_REGION},
    }
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "BGREMOVAL_STATE": str(paths.root),
        "BGREMOVAL_BUCKET": bucket,
        "AIRFLOW__BGREMOVAL__BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_ENDPOINT_URL": endpoint,
        **airflow_environment(paths.airflow_home),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,reviewer:op",
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws_conn),
        "MLFLOW_TRACKING_URI": f"sqlite:///{paths.mlflow / 'mlflow.db'}",
        "BGREMOVAL_MLFLOW_ARTIFACTS": str(paths.mlflow / "artifacts"),
    }
    if api_port:
        env.update(api_server_environment(api_port))
    return env


def airflow_environment(airflow_home: Path) -> dict[str, str]:
    """The Airflow settings every local Airflow of this project shares (the stack's, the tests'):
    its home and SQLite database, this project's DAGs and plugins, no examples, parallelism 4,
    deferrable operators."""
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
    }


def api_server_environment(port: int) -> dict[str, str]:
    """The settings that make ``airflow api-server`` listen on loopback ``port`` and build its links."""
    return {
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }


def write_env_file(paths: StackPaths, env: dict[str, str]) -> None:
    """Write ``env`` as ``export`` lines a shell can ``source`` (and the CLI reads back)."""
    lines = [f"export {key}={_shell_quote(value)}" for key, value in sorted(env.items())]
    paths.env_file.write_text("\n".join(lines) + "\n")


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


# ------------------------------------------------------------------------------ up / down


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the S3 API at ``endpoint`` (with the stack's keys) unless it exists."""
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name=S3_REGION
    )
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


#: The Airflow pools the DAGs use (``airflow pools import`` format), shipped with the plugin.
POOLS_FILE = PROJECT_ROOT / "plugins" / "bgremoval_airflow" / "pools.json"


def _migrate_airflow(paths: StackPaths, env: dict[str, str]) -> None:
    """Migrate Airflow's database and import the DAGs' pools, once per state folder (a marker says
    which steps are done, so an older state gets the pools on its next start)."""
    paths.airflow_home.mkdir(parents=True, exist_ok=True)
    marker = paths.airflow_home / ".migrated"
    done = marker.read_text().split() if marker.exists() and (paths.airflow_home / "airflow.db").exists() else []
    with open(paths.logs / "airflow-db-migrate.log", "ab") as log:
        if "migrated" not in done:
            subprocess.run([venv_bin("airflow"), "db", "migrate"], env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        if "pools" not in done:
            subprocess.run([venv_bin("airflow"), "pools", "import", str(POOLS_FILE)], env=env, check=True, stdout=log,
                           stderr=subprocess.STDOUT)
    marker.write_text("migrated pools\n")


def status(state_dir: Path | None = None) -> dict:
    """Return ``{"running": {name: pid}, "info": stack.json contents}`` for the stack in ``state_dir``."""
    paths = StackPaths(state_dir or default_state_dir())
    running = {}
    if paths.pids.exists():
        for pid_file in sorted(paths.pids.glob("*.pid")):
            proc = _recorded_process(pid_file)
            if proc is not None:
                running[pid_file.stem] = proc.pid
    info = json.loads(paths.info_file.read_text()) if paths.info_file.exists() else {}
    return {"running": running, "info": info}


AIRFLOW_MODES = ("none", "api-server", "standalone")
#: Said when the embedded S3 starts again next to an earlier Airflow or MLflow state.
S3_RESTARTED = ("the embedded S3 (moto) keeps its objects in memory: what it held before it stopped is gone, "
                "while this state folder's Airflow history and MLflow registry remain and name datasets and "
                "models that no longer exist there. Remove the state folder for a fresh stack.")


def up(state_dir: Path | None = None, airflow: str = "none", bucket: str = DEFAULT_BUCKET) -> dict:
    """Start the embedded stack (idempotent) and return its info.

    Takes the state folder; ``airflow``: ``"none"`` (S3 and the prepared Airflow home only),
    ``"api-server"`` (the REST API, the UI and the review pages, no scheduler: runs are executed
    by ``airflow dags test``) or ``"standalone"`` (everything, for ``make up``); and the bucket to
    create. Returns ``{"s3_endpoint", "bucket", "env_file"}`` plus ``"airflow_url"`` and
    ``"login"`` when Airflow serves HTTP, and ``"warnings"`` (:data:`S3_RESTARTED`). Asked for
    ``"standalone"`` while an api-server alone runs (``demo --keep``), it replaces it on its port.
    """
    if airflow not in AIRFLOW_MODES:
        raise ValueError(f"airflow must be one of {AIRFLOW_MODES}, got {airflow!r}")
    paths = StackPaths(state_dir or default_state_dir())
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(exist_ok=True)
    paths.mlflow.mkdir(exist_ok=True)
    (paths.mlflow / "artifacts").mkdir(exist_ok=True)
    current = status(paths.root)
    info = current["info"]

    warnings = []
    if "moto" in current["running"] and info.get("s3_port"):
        s3_port = int(info["s3_port"])
    else:
        if (paths.mlflow / "mlflow.db").exists() or (paths.airflow_home / "airflow.db").exists():
            warnings.append(S3_RESTARTED)
        s3_port = free_port()
        proc = start_process(paths, "moto", [venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], dict(os.environ))
        wait_http(f"http://127.0.0.1:{s3_port}/moto-api/", 60, proc, paths.logs / "moto.log")
    endpoint = f"http://127.0.0.1:{s3_port}"
    create_bucket(endpoint, bucket)

    airflow_running = "airflow" in current["running"] and info.get("api_port")
    api_port = int(info["api_port"]) if airflow_running else (free_port() if airflow != "none" else None)
    if airflow_running and airflow == "standalone" and _airflow_mode(paths, info) != "standalone":
        # an api-server alone (what `demo --keep` leaves): the whole of Airflow takes its place and port
        if (api_server := _recorded_process(paths.pids / "airflow.pid")) is not None:
            stop_process_tree(api_server)
        (paths.pids / "airflow.pid").unlink(missing_ok=True)
        airflow_running = False
    env = stack_environment(paths, s3_port, api_port, bucket)
    write_env_file(paths, env)
    full_env = {**os.environ, **env}
    _migrate_airflow(paths, full_env)

    mode = _airflow_mode(paths, info) if airflow_running else airflow
    info = {"s3_port": s3_port, "s3_endpoint": endpoint, "bucket": bucket, "env_file": str(paths.env_file)}
    if api_port:
        if not airflow_running:
            argv = [venv_bin("airflow"), "standalone"] if airflow == "standalone" else [venv_bin("airflow"), "api-server"]
            proc = start_process(paths, "airflow", argv, full_env)
            wait_http(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", 240, proc, paths.logs / "airflow.log")
        info.update(api_port=api_port, airflow_url=f"http://127.0.0.1:{api_port}", login=airflow_login(paths),
                    airflow_mode=mode)
    paths.info_file.write_text(json.dumps(info, indent=2))
    return {**info, "warnings": warnings}


def _airflow_mode(paths: StackPaths, info: dict) -> str:
    """How the running Airflow was started: as recorded, else (a state written before the mode was
    recorded) from its command line."""
    if info.get("airflow_mode"):
        return info["airflow_mode"]
    proc = _recorded_process(paths.pids / "airflow.pid")
    try:
        return "standalone" if proc is not None and "standalone" in proc.cmdline() else "api-server"
    except psutil.Error:
        return "api-server"


def airflow_login(paths: StackPaths) -> dict[str, str]:
    """Return the simple auth manager's generated logins ``{user: password}`` (empty until written)."""
    generated = paths.airflow_home / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + 30
    while not generated.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return json.loads(generated.read_text()) if generated.exists() else {}


def down(state_dir: Path | None = None) -> list[str]:
    """Stop every process the stack recorded (children first) and return the names stopped."""
    paths = StackPaths(state_dir or default_state_dir())
    stopped = []
    if paths.pids.exists():
        for pid_file in sorted(paths.pids.glob("*.pid")):
            proc = _recorded_process(pid_file)
            if proc is not None:
                stop_process_tree(proc)
                stopped.append(pid_file.stem)
            pid_file.unlink(missing_ok=True)
    if paths.info_file.exists():
        paths.info_file.unlink()
    return stopped
