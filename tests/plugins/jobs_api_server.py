"""A small Databricks Jobs API 2.2 server on loopback that really runs what is submitted.

It speaks the part of the API that ``DatabricksSubmitRunOperator`` (provider 7.23.0, deferrable or
not) calls through ``DatabricksHook``: ``POST /api/2.2/jobs/runs/submit``, ``GET /api/2.2/jobs/runs/get``,
``GET /api/2.2/jobs/runs/get-output`` (for a failed task's error) and ``POST /api/2.2/jobs/runs/cancel``.
A submission whose ``idempotency_token`` was used before gets that run's id and starts nothing.

A submitted run must have the shape the training DAG sends (one task with ``new_cluster``, wheel
``libraries`` and a ``spark_python_task``); the server then plays the cluster. With a
``cluster_python`` (a virtual environment standing for the Databricks runtime, with its own
preinstalled packages), it first installs the task's ``whl`` libraries into that environment as a
cluster does when it starts (``libraries`` maps each library path, e.g. ``/Volumes/...whl``, to a
local wheel; a missing one or a failed installation fails the run before it starts, with
Databricks' "Library installation failed" message), and runs the task with that interpreter and no
``PYTHONPATH``: the code comes from the installed wheel only. Without one it runs the interpreter
running the tests, where the project is installed. It maps the task's ``python_file`` to a local
file through ``python_files`` and runs ``python <that file> <parameters>`` as a subprocess with the
cluster's ``spark_env_vars`` and ``spark_conf``, pyspark in local mode (``PYSPARK_SUBMIT_ARGS=--master
local[<cores>]``) and the same interpreter as ``PYSPARK_PYTHON``. The run goes PENDING → RUNNING →
TERMINATED with result SUCCESS or FAILED from
the exit status (CANCELED after ``runs/cancel``); a failed run's state message and ``get-output``
error carry the last line of its stderr. ``run_page_url`` is ``<server>/runs/<run_id>``, a
plain-text page with the state and the output.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tasks.train.ddp import stop_process_group

API = "/api/2.2/jobs"


class PayloadError(ValueError):
    """A submitted payload the server (like Databricks) rejects with HTTP 400."""


@dataclass
class FakeRun:
    """One submitted run and its single task run."""

    run_id: int
    task_run_id: int
    job_id: int
    payload: dict[str, Any]
    command: list[str]
    env: dict[str, str]
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = "Waiting for cluster"
    start_time: int = field(default_factory=lambda: int(time.time() * 1000))
    end_time: int = 0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    process: subprocess.Popen | None = None
    cancel_requested: bool = False
    install_log: str = ""

    def state(self) -> dict[str, Any]:
        """The run's ``state`` object as the Jobs API returns it."""
        state: dict[str, Any] = {"life_cycle_state": self.life_cycle_state, "state_message": self.state_message}
        if self.result_state is not None:
            state["result_state"] = self.result_state
        return state


def validate_submit_payload(payload: Any) -> dict[str, Any]:
    """Check a ``runs/submit`` body has the shape the training DAG must send; return its one task.

    Raises :class:`PayloadError` naming the first problem (the server answers 400 with it)."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object")
    if not isinstance(payload.get("run_name", ""), str):
        raise PayloadError("run_name must be a string")
    tasks = payload.get("tasks")
    if not isinstance(tasks, list) or len(tasks) != 1 or not isinstance(tasks[0], dict):
        raise PayloadError("tasks must be a list of exactly one task")
    task = tasks[0]
    if not task.get("task_key"):
        raise PayloadError("tasks[0].task_key is required")
    cluster = task.get("new_cluster")
    if not isinstance(cluster, dict):
        raise PayloadError("tasks[0].new_cluster is required (this server has no existing clusters)")
    for key in ("spark_version", "node_type_id"):
        if not isinstance(cluster.get(key), str) or not cluster[key]:
            raise PayloadError(f"tasks[0].new_cluster.{key} must be a non-empty string")
    # DatabricksHook sends numbers as strings (normalise_json_content); the API accepts both.
    workers = cluster.get("num_workers")
    if isinstance(workers, bool) or not (isinstance(workers, int) or (isinstance(workers, str) and workers.isdigit())):
        raise PayloadError("tasks[0].new_cluster.num_workers must be a non-negative integer")
    for key in ("spark_conf", "spark_env_vars", "custom_tags"):
        value = cluster.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise PayloadError(f"tasks[0].new_cluster.{key} must map names to strings")
    libraries = task.get("libraries")
    if not isinstance(libraries, list) or not any(isinstance(lib, dict) and lib.get("whl") for lib in libraries):
        raise PayloadError("tasks[0].libraries must hold a {'whl': ...} library")
    python_task = task.get("spark_python_task")
    if not isinstance(python_task, dict) or not isinstance(python_task.get("python_file"), str):
        raise PayloadError("tasks[0].spark_python_task.python_file is required")
    parameters = python_task.get("parameters", [])
    if not isinstance(parameters, list) or not all(isinstance(p, str) for p in parameters):
        raise PayloadError("tasks[0].spark_python_task.parameters must be a list of strings")
    return task


class FakeJobsServer:
    """The Jobs API server: ``with FakeJobsServer(python_files=...) as server: ...``.

    Args:
        python_files: ``python_file`` of a submitted task (e.g. ``dbfs:/FileStore/.../train_entry.py``)
            → the local file to run in its place; another path fails the run, as on Databricks.
        token: the bearer token every request must carry (the connection's password).
        cores: the local Spark master is ``local[cores]`` (the simulated cluster's task slots).
        extra_env: more environment variables for the entry point (e.g. ``OMP_NUM_THREADS``).
        cluster_python: the runtime's interpreter (None: the tests' own, without installing libraries).
        libraries: a ``whl`` library path → the local wheel file installed in its place.
        install_command: the command that installs a local wheel into the runtime (the wheel's path
            is appended), e.g. ``[uv, "pip", "install", "--python", cluster_python]``.
        cluster_env: the environment of the runtime's processes (default: this process's, without
            ``PYTHONPATH`` when there is a ``cluster_python``).

    ``submissions`` holds every accepted payload, ``runs`` every run by id, ``url`` the base URL,
    ``installed`` every local wheel a run installed.
    """

    def __init__(self, python_files: dict[str, str], token: str = "fake-token", cores: int = 2,
                 extra_env: dict[str, str] | None = None, cluster_python: str | None = None,
                 libraries: dict[str, str] | None = None, install_command: list[str] | None = None,
                 cluster_env: dict[str, str] | None = None) -> None:
        if cluster_python is not None and install_command is None:
            raise ValueError("a cluster_python needs the install_command that installs its libraries")
        self.python_files = dict(python_files)
        self.cluster_python = cluster_python
        self.libraries = dict(libraries or {})
        self.install_command = list(install_command or [])
        base_env = dict(cluster_env if cluster_env is not None else os.environ)
        if cluster_python is not None:
            base_env.pop("PYTHONPATH", None)
        self.base_env = base_env
        self.installed: list[str] = []
        self.token = token
        self.cores = cores
        self.extra_env = dict(extra_env or {})
        self.submissions: list[dict[str, Any]] = []
        self.runs: dict[int, FakeRun] = {}
        self.requests: list[tuple[str, str]] = []
        self._ids = itertools.count(1001)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-jobs-api", daemon=True)

    @property
    def port(self) -> int:
        """The loopback port the server listens on."""
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.port}"

    def connection_uri_json(self) -> str:
        """The ``AIRFLOW_CONN_<ID>`` JSON of a Databricks connection to this server."""
        return json.dumps({"conn_type": "databricks", "host": "127.0.0.1", "port": self.port, "schema": "http",
                           "password": self.token})

    def start(self) -> FakeJobsServer:
        """Start serving in a background thread; return self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and kill any entry point still running."""
        for run in list(self.runs.values()):
            if run.process is not None and run.process.poll() is None:
                stop_process_group(run.process)
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeJobsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_run(self, run_id: int, timeout_s: float) -> FakeRun:
        """Block until run ``run_id`` has terminated; return it (``TimeoutError`` otherwise)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.runs[run_id]
            if run.life_cycle_state == "TERMINATED":
                return run
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} still {self.runs[run_id].life_cycle_state} after {timeout_s} s")

    # -- runs ---------------------------------------------------------------------------------

    def _submit(self, payload: dict[str, Any]) -> FakeRun:
        task = validate_submit_payload(payload)
        token = payload.get("idempotency_token")
        if token is not None:  # the Jobs API: a token already used answers with that run, no new one
            if not isinstance(token, str) or not 0 < len(token) <= 64:
                raise PayloadError("idempotency_token must be a string of 1 to 64 characters")
            with self._lock:
                earlier = next((r for r in self.runs.values() if r.payload.get("idempotency_token") == token), None)
            if earlier is not None:
                return earlier
        cluster = task["new_cluster"]
        python_task = task["spark_python_task"]
        local_file = self.python_files.get(python_task["python_file"])
        python = self.cluster_python or sys.executable
        command = [python, local_file or python_task["python_file"], *python_task.get("parameters", [])]
        submit_args = ["--master", f"local[{self.cores}]", "--conf", "spark.ui.enabled=false"]
        for key, value in cluster.get("spark_conf", {}).items():
            if key not in ("spark.master", "spark.databricks.cluster.profile"):
                submit_args += ["--conf", f"{key}={value}"]
        env = {**self.base_env, **self.extra_env, **cluster.get("spark_env_vars", {}),
               "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python,
               "PYSPARK_SUBMIT_ARGS": " ".join(submit_args + ["pyspark-shell"])}
        with self._lock:
            run = FakeRun(run_id=next(self._ids), task_run_id=next(self._ids), job_id=next(self._ids),
                          payload=payload, command=command, env=env)
            self.runs[run.run_id] = run
            self.submissions.append(payload)
        if local_file is None:
            self._finish(run, 1, f"Python file {python_task['python_file']} does not exist")
        else:
            threading.Thread(target=self._execute, args=(run,), name=f"run-{run.run_id}", daemon=True).start()
        return run

    def _install_libraries(self, run: FakeRun) -> str | None:
        """Install the task's wheel libraries into the runtime; the reason when one fails."""
        for library in run.payload["tasks"][0]["libraries"]:
            path = library.get("whl") if isinstance(library, dict) else None
            if not path:
                continue
            local = self.libraries.get(path)
            if local is None:
                return f"Library installation failed: {path} does not exist"
            done = subprocess.run([*self.install_command, local], capture_output=True, text=True, env=self.base_env,
                                  timeout=600)
            run.install_log += done.stdout + done.stderr
            if done.returncode != 0:
                lines = [line for line in done.stderr.splitlines() if line.strip()]
                return f"Library installation failed for {path}: {lines[-1] if lines else done.returncode}"
            self.installed.append(local)
        return None

    def _execute(self, run: FakeRun) -> None:
        time.sleep(0.5)  # "starting the cluster": lets a poller see PENDING first
        if run.cancel_requested:
            self._finish(run, None, "Run cancelled before it started")
            return
        if self.cluster_python is not None:
            run.state_message = "Installing libraries"
            failure = self._install_libraries(run)
            if failure is not None:
                self._finish(run, 1, failure)
                return
        # cwd: the launcher's folder, not the project, as on a cluster where only the wheel holds the code.
        process = subprocess.Popen(run.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run.env,
                                   cwd=os.path.dirname(run.command[1]), start_new_session=True, text=True)
        run.process = process
        run.life_cycle_state, run.state_message = "RUNNING", "In run"
        stdout, stderr = process.communicate()
        run.stdout, run.stderr = stdout, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        self._finish(run, process.returncode, lines[-1] if lines else f"exit status {process.returncode}")

    def _finish(self, run: FakeRun, returncode: int | None, last_error: str) -> None:
        run.returncode = returncode
        run.end_time = int(time.time() * 1000)
        if run.cancel_requested:
            run.result_state, run.state_message = "CANCELED", "Run cancelled"
        elif returncode == 0:
            run.result_state, run.state_message = "SUCCESS", ""
        else:
            run.result_state = "FAILED"
            run.state_message = f"Task train failed with message: {last_error}"
        run.life_cycle_state = "TERMINATED"

    def _cancel(self, run: FakeRun) -> None:
        run.cancel_requested = True
        if run.process is not None and run.process.poll() is None:
            stop_process_group(run.process)

    def _run_json(self, run: FakeRun) -> dict[str, Any]:
        task = run.payload["tasks"][0]
        return {
            "job_id": run.job_id, "run_id": run.run_id, "run_name": run.payload.get("run_name", "Untitled"),
            "run_type": "SUBMIT_RUN", "state": run.state(), "start_time": run.start_time, "end_time": run.end_time,
            "run_page_url": f"{self.url}/runs/{run.run_id}",
            "tasks": [{
                "run_id": run.task_run_id, "task_key": task["task_key"], "attempt_number": 0,
                "state": run.state(), "start_time": run.start_time, "end_time": run.end_time,
                "new_cluster": task["new_cluster"], "libraries": task["libraries"],
                "spark_python_task": task["spark_python_task"],
            }],
        }

    def _find(self, run_id: int) -> tuple[FakeRun, bool]:
        """Return ``(run, is_task_run)`` for a run id or a task run id; ``KeyError`` when unknown."""
        if run_id in self.runs:
            return self.runs[run_id], False
        for run in self.runs.values():
            if run.task_run_id == run_id:
                return run, True
        raise KeyError(run_id)

    def _run_page(self, run: FakeRun) -> str:
        return (f"run {run.run_id}: {run.life_cycle_state} {run.result_state or ''}\n{run.state_message}\n\n"
                f"$ {' '.join(run.command[:2])} ...\n--- stdout ---\n{run.stdout}\n--- stderr ---\n{run.stderr}")

    # -- HTTP ---------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _send(self, status: int, body: dict[str, Any] | str) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, code: str, message: str) -> None:
                self._send(status, {"error_code": code, "message": message})

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {server.token}":
                    return True
                self._error(401, "UNAUTHENTICATED", "missing or wrong bearer token")
                return False

            def _json_body(self) -> dict[str, Any] | None:
                """The request's JSON object body ({} when empty); None after answering 400."""
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = None
                if not isinstance(body, dict):
                    self._error(400, "MALFORMED_REQUEST", "the body is not a JSON object")
                    return None
                return body

            def _run_id(self, query: dict[str, list[str]], body: dict[str, Any]) -> int | None:
                raw = body.get("run_id", (query.get("run_id") or [None])[0])
                try:
                    return int(raw)
                except (TypeError, ValueError):
                    self._error(400, "INVALID_PARAMETER_VALUE", "run_id is required")
                    return None

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                server.requests.append(("GET", parts.path))
                query = parse_qs(parts.query)
                if parts.path.startswith("/runs/"):
                    try:
                        self._send(200, server._run_page(server._find(int(parts.path.rsplit("/", 1)[1]))[0]))
                    except (KeyError, ValueError):
                        self._send(404, "no such run")
                    return
                if not self._authorised():
                    return
                if parts.path not in (f"{API}/runs/get", f"{API}/runs/get-output"):
                    self._error(404, "ENDPOINT_NOT_FOUND", f"no endpoint GET {parts.path}")
                    return
                body = self._json_body()
                if body is None:
                    return
                # The hook's sync calls send run_id as a query parameter, its async ones as a JSON body.
                run_id = self._run_id(query, body)
                if run_id is None:
                    return
                try:
                    run, is_task = server._find(run_id)
                except KeyError:
                    self._error(404, "RESOURCE_DOES_NOT_EXIST", f"Run {run_id} does not exist.")
                    return
                if parts.path.endswith("/runs/get"):
                    body = server._run_json(run)
                    if is_task:
                        body = {**body, "run_id": run.task_run_id, "tasks": []}
                    self._send(200, body)
                    return
                if not is_task:
                    self._error(400, "INVALID_PARAMETER_VALUE", "Retrieving the output of runs with multiple tasks "
                                "is not supported: use the task run id")
                    return
                output: dict[str, Any] = {"metadata": server._run_json(run)["tasks"][0],
                                          "logs": run.stdout[-5000:], "logs_truncated": len(run.stdout) > 5000}
                if run.result_state == "FAILED":
                    output["error"] = run.state_message.removeprefix("Task train failed with message: ")
                    output["error_trace"] = run.stderr[-5000:]
                self._send(200, output)

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                server.requests.append(("POST", parts.path))
                if not self._authorised():
                    return
                body = self._json_body()
                if body is None:
                    return
                if parts.path == f"{API}/runs/submit":
                    try:
                        run = server._submit(body)
                    except PayloadError as exc:
                        self._error(400, "INVALID_PARAMETER_VALUE", str(exc))
                        return
                    self._send(200, {"run_id": run.run_id})
                elif parts.path == f"{API}/runs/cancel":
                    run_id = self._run_id({}, body)
                    if run_id is None:
                        return
                    try:
                        server._cancel(server._find(run_id)[0])
                    except KeyError:
                        self._error(404, "RESOURCE_DOES_NOT_EXIST", f"Run {run_id} does not exist.")
                        return
                    self._send(200, {})
                else:
                    self._error(404, "ENDPOINT_NOT_FOUND", f"no endpoint POST {parts.path}")

        return Handler


