"""The production executor configuration for real, without containers.

docker-compose.yaml runs Airflow with the CeleryExecutor on PostgreSQL with a Redis broker. This
test starts the same set of servers as plain processes on loopback, with the settings the compose
file gives them (Postgres metadata database and Celery result backend, Redis broker, the execution
API reached over HTTP by the workers, shared JWT/Fernet/API secrets):

    PostgreSQL (initdb + pg_ctl, a temporary cluster)   redis-server (no persistence)
    airflow api-server | scheduler | dag-processor | triggerer | celery worker

It triggers ``bgremoval_training`` through the REST API on a small generated batch in moto S3 and
checks that the stages up to the review gate ran as Celery tasks (task states, the scheduler job's
executor, Celery's result rows in Postgres, the worker's hostname on every task instance), that the
run then waits at ``review_clusters``, and that a reviewer's Reject ends it with training skipped.

Skipped when PostgreSQL (initdb, pg_ctl) or redis-server are not installed, except with
``CI=true``, where a missing server is a failure (``.ci/run`` installs redis-server).
"""

from __future__ import annotations

import base64
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tasks.dev import stack
from tasks.core import storage
from tasks.data import review
from tasks.dev.airflow_client import AirflowClient, AirflowHTTPError
from tasks.dev.synth import SynthConfig, generate_catalogue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

DAG_ID = "bgremoval_training"
USERS = {"admin": ("admin", "celery-admin-pw"), "reviewer": ("user", "celery-reviewer-pw")}
# Tasks that must have run (on a Celery worker) before the run waits at the review gate.
BEFORE_GATE = ("wait_for_batch", "plan_shards", "shards", "clean_shard", "finalize_dataset",
               "feature_shards", "extract_features", "cluster_products")


# ------------------------------------------------------------------------------ servers


def _missing(what: str) -> None:
    message = f"{what}; install it (Debian: apt-get install -y {'redis-server' if 'redis' in what else 'postgresql'})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _run_as() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if not runuser:
        _missing("running as root without `runuser` to start PostgreSQL as another user")
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return [runuser, "-u", user, "--"]
        except KeyError:
            continue
    _missing("running as root and no 'postgres' or 'nobody' user to start PostgreSQL as")
    return []


class Postgres:
    """A throw-away PostgreSQL cluster in ``root`` on a loopback port (trust auth, no fsync)."""

    def __init__(self, root: Path):
        initdb, self.pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
        if not initdb or not self.pg_ctl:
            _missing("PostgreSQL (initdb, pg_ctl) is not installed")
        self.initdb = initdb
        self.prefix = _run_as()
        self.root = root
        self.data = root / "pgdata"
        self.port = stack.free_port()
        self.started = False

    def start(self) -> None:
        if self.prefix:
            user = self.prefix[2]
            shutil.chown(self.root, user=user)
        subprocess.run([*self.prefix, self.initdb, "-D", str(self.data), "-U", "airflow", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, cwd="/")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off -c max_connections=200"
        subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "postgres.log"),
                        "-w", "-t", "60", "start"], check=True, capture_output=True, cwd="/")
        self.started = True
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="airflow", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE airflow")
        conn.close()

    def dsn(self, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://airflow@127.0.0.1:{self.port}/airflow"

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="airflow", dbname="airflow")
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.started:
            subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                           capture_output=True, cwd="/")
            self.started = False


def _redis_server() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if not found:
        _missing("redis-server is not installed")
    return found


def _check_celery_executor_imports() -> None:
    """The scheduler and the workers import the Celery executor; a Celery release the provider does
    not support breaks them at start-up (celery 5.7 removed what provider 3.26 imports)."""
    try:
        import airflow.providers.celery.executors.celery_executor  # noqa: F401
    except ImportError as error:
        from importlib.metadata import version

        pytest.fail(f"the CeleryExecutor does not import with celery {version('celery')} and "
                    f"apache-airflow-providers-celery {version('apache-airflow-providers-celery')}: {error}. "
                    "Pin a Celery release the provider supports in constraints.txt (celery==5.6.3 works).")


def _wait_port(port: int, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_running():
            raise RuntimeError(f"the server for port {port} exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _log_tails(paths: stack.StackPaths, chars: int = 2500) -> str:
    parts = []
    for log in sorted(paths.logs.glob("*.log")):
        parts.append(f"----- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


@pytest.fixture()
def celery_stack(moto_endpoint, s3_bucket):
    """Postgres, Redis and the five Airflow components with the CeleryExecutor; yields a dict
    ``{"url", "postgres", "paths", "bucket_url", "options"}``. Every process is stopped by PID."""
    from cryptography.fernet import Fernet

    redis_bin = _redis_server()
    root = Path(tempfile.mkdtemp(prefix="bgremoval-celery-"))
    started: list = []
    postgres = None
    try:
        root.chmod(0o755)
        paths = stack.StackPaths(root / "stack")
        paths.logs.mkdir(parents=True)
        postgres = Postgres(root)  # skips (or fails with CI=true) when PostgreSQL is not installed
        _check_celery_executor_imports()
        postgres.start()
        redis_port = stack.free_port()
        redis = stack.start_process(paths, "redis", [
            redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(root), "--protected-mode", "yes"], dict(os.environ))
        started.append(redis)
        _wait_port(redis_port, 30, redis)

        api_port = stack.free_port()
        base = f"http://127.0.0.1:{api_port}"
        home = root / "airflow"
        home.mkdir()
        passwords = home / "passwords.json"
        passwords.write_text("{" + ", ".join(f'"{u}": "{pw}"' for u, (_, pw) in USERS.items()) + "}")
        env = {
            **os.environ,  # s3_bucket has pointed AIRFLOW_CONN_AWS_DEFAULT and the AWS_* variables at moto
            "AIRFLOW_HOME": str(home),
            # The settings docker-compose.yaml gives every Airflow container:
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.dsn(),
            "AIRFLOW__CELERY__RESULT_BACKEND": postgres.dsn("db+postgresql"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__API_AUTH__JWT_SECRET": base64.b64encode(os.urandom(24)).decode(),
            "AIRFLOW__API__SECRET_KEY": base64.b64encode(os.urandom(24)).decode(),
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
            "AIRFLOW__BGREMOVAL__TRAINING_DEADLINE_HOURS": "100",  # as the compose file: the deadline alert on
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{role}" for u, (role, _) in USERS.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            # Small-machine settings (2 cores): one API worker, two Celery processes, quick polling.
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # Log servers on free ports, so parallel test sessions do not collide.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(stack.free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(stack.free_port()),
        }
        migrate = subprocess.run([stack.venv_bin("airflow"), "db", "migrate"], env=env, capture_output=True, text=True)
        assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]

        airflow = stack.venv_bin("airflow")
        api = stack.start_process(paths, "api-server", [airflow, "api-server", "--port", str(api_port)], env)
        started.append(api)
        for name, argv in (
            ("dag-processor", [airflow, "dag-processor"]),
            ("scheduler", [airflow, "scheduler"]),
            ("triggerer", [airflow, "triggerer"]),
            ("celery-worker", [airflow, "celery", "worker", "--concurrency", "2", "--without-mingle", "--without-gossip"]),
        ):
            started.append(stack.start_process(paths, name, argv, env))
        stack.wait_http(f"{base}/api/v2/monitor/health", 180, api, paths.logs / "api-server.log")
        bucket_url, options = s3_bucket
        yield {"url": base, "postgres": postgres, "paths": paths, "bucket_url": bucket_url, "options": options,
               "processes": dict(zip(("redis", "api-server", "dag-processor", "scheduler", "triggerer", "celery-worker"), started))}
    finally:
        # Stop the consumers before what they consume: worker, triggerer, scheduler, ..., Redis, Postgres.
        for proc in reversed(started):
            stack.stop_process_tree(proc, timeout=12)
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------ the test


def _wait(what: str, predicate, timeout: float, servers: dict, poll: float = 1.0):
    """Poll ``predicate`` until it returns something truthy; fail at once (with the logs) when a
    server has died, or after ``timeout`` seconds."""
    paths = servers["paths"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [name for name, proc in servers["processes"].items() if not _alive(proc)]
        if dead:
            raise AssertionError(f"{', '.join(dead)} exited while waiting for {what}\n{_log_tails(paths)}")
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{_log_tails(paths)}")


def _task_instances(client: AirflowClient, run_id: str) -> list[dict]:
    return client.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=200")["task_instances"]


def test_training_dag_runs_on_celery_workers_against_postgres_and_redis(celery_stack):
    url, paths, postgres = celery_stack["url"], celery_stack["paths"], celery_stack["postgres"]
    bucket_url, options = celery_stack["bucket_url"], celery_stack["options"]
    bucket = bucket_url.removeprefix("s3://")
    generate_catalogue(storage.join(bucket_url, "raw", "celery-1"), SynthConfig(n=24, seed=3, max_side=240), options)

    admin = AirflowClient(url, "admin", USERS["admin"][1])
    reviewer = AirflowClient(url, "reviewer", USERS["reviewer"][1])

    def dag_parsed():
        try:
            return admin.request("GET", f"/api/v2/dags/{DAG_ID}")
        except AirflowHTTPError as error:
            if error.status == 404:
                return None
            raise

    _wait("the dag-processor to parse the training DAG", dag_parsed, 180, celery_stack)
    admin.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})  # what the UI's toggle does
    conf = {"batch": "celery-1", "bucket": bucket, "shard_size": 12, "working_size": 128}
    run = admin.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                        {"dag_run_id": "celery-run-1", "logical_date": None, "conf": conf})
    run_id = run["dag_run_id"]

    # The run goes through cleaning, features and clustering, then waits for a reviewer.
    detail = _wait("the review gate", lambda: next(
        (d for d in reviewer.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/hitlDetails")["hitl_details"]
         if not d.get("response_received")), None), 300, celery_stack, poll=2)
    assert detail["task_instance"]["task_id"] == "review_clusters"
    deadlines = f"SELECT d.missed FROM deadline d JOIN dag_run r ON r.id = d.dagrun_id WHERE r.run_id = '{run_id}'"
    assert postgres.query(deadlines) == [(False,)]  # the deadline alert was set when the run was queued
    tis = _task_instances(admin, run_id)
    states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
    assert states[("review_clusters", -1)] in ("awaiting_input", "deferred"), states  # 3.3 calls it awaiting_input
    assert states[("apply_review", -1)] is None, states  # nothing after the gate has started
    for task_id in BEFORE_GATE:
        instances = [t for t in tis if t["task_id"] == task_id]
        assert instances and all(t["state"] == "success" for t in instances), (task_id, states)
    assert len([t for t in tis if t["task_id"] == "clean_shard"]) == 2  # 24 pairs in shards of 12
    assert len([t for t in tis if t["task_id"] == "extract_features"]) == 2
    executed = [t for t in tis if t["task_id"] in BEFORE_GATE]
    worker_host = socket.getfqdn()
    assert all(t["hostname"] and t["queue"] == "default" for t in executed), executed

    # The executor really was Celery: every task instance carries the id of the Celery task that
    # ran it (external_executor_id), and Celery's result backend in Postgres recorded that task
    # as a success. The worker records that a moment after the task instance reports its own
    # success (its supervisor still uploads the log), so the last task may read STARTED briefly.
    def celery_records():
        rows = {(task_id, map_index): (celery_id, status) for task_id, map_index, celery_id, status in postgres.query(
            "SELECT ti.task_id, ti.map_index, ti.external_executor_id, cm.status FROM task_instance ti "
            "LEFT JOIN celery_taskmeta cm ON cm.task_id = ti.external_executor_id "
            f"WHERE ti.dag_id = '{DAG_ID}' AND ti.run_id = '{run_id}'")}
        done = all(rows[(t["task_id"], t["map_index"])][1] not in (None, "PENDING", "STARTED") for t in executed)
        return rows if done else None

    celery = _wait("Celery to record the finished tasks", celery_records, 60, celery_stack)
    for t in executed:
        celery_id, status = celery[(t["task_id"], t["map_index"])]
        assert celery_id and status == "SUCCESS", (t["task_id"], t["map_index"], celery_id, status)
    worker_log = (paths.logs / "celery-worker.log").read_text(errors="replace")
    assert "succeeded" in worker_log and "execute_workload" in worker_log

    # The stages wrote the dataset and the clusters to S3.
    version = detail["body"].split("/bgremoval/review/")[1].split("?")[0]
    dataset = storage.join(bucket_url, "datasets", version)
    assert storage.exists(storage.join(dataset, "manifest.parquet"), options)
    assert storage.exists(storage.join(dataset, "clusters", "clusters.json"), options)

    # The reviewer rejects: the deferred gate resumes on a worker, and nothing downstream trains.
    reviewer.answer(detail, "Reject")
    final = _wait("the run to finish after Reject", lambda: (
        lambda r: r if r["state"] in ("success", "failed") else None)(
        admin.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")), 180, celery_stack)
    states = {(t["task_id"], t["map_index"]): t["state"] for t in _task_instances(admin, run_id)}
    assert final["state"] == "success", (states, _log_tails(paths))
    assert states[("review_clusters", -1)] == "success"
    assert states[("apply_review", -1)] == "skipped" and states[("train_model", -1)] == "skipped", states
    # The gate's worker recorded the answer with the review, so the review page says who rejected it.
    assert review.review_status(dataset, options) == "rejected"
    assert review.load_review_state(dataset, options).rejected["by"] == "reviewer"
    assert postgres.query(deadlines) == []  # a run that finished in time leaves no deadline behind
    print(f"{len(executed)} task instances before the gate ran as Celery tasks on {worker_host}")
