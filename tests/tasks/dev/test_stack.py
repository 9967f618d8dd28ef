"""The embedded stack: started by the CLI, found again by PID files, stopped by PID (also after a crash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tasks.dev import stack, stack_env

pytestmark = pytest.mark.process

BIN = Path(sys.executable).parent


def _cli(*args: str, state: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_"))}
    return subprocess.run(
        [str(BIN / "bgremoval"), "stack", *args, "--state", str(state)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def _pids(state: Path) -> dict[str, int]:
    return {p.stem: json.loads(p.read_text())["pid"] for p in (state / "pids").glob("*.pid")}


def test_project_root_holds_the_dags_and_plugins_the_stack_serves():
    # the stack points Airflow at PROJECT_ROOT/dags and /plugins: a wrong root serves no DAG at all
    assert stack.PROJECT_ROOT == Path(__file__).resolve().parents[3]
    assert (stack.PROJECT_ROOT / "dags" / "bgremoval_training.py").is_file()
    assert (stack.PROJECT_ROOT / "plugins" / "bgremoval_airflow").is_dir()


def test_up_is_idempotent_and_down_stops_by_pid_after_the_starter_is_gone(tmp_path):
    state = tmp_path / "state"
    first = _cli("up", state=state)
    assert first.returncode == 0, first.stderr
    info = json.loads((state / "stack.json").read_text())
    pids = _pids(state)
    assert set(pids) == {"moto"}
    with urllib.request.urlopen(f"{info['s3_endpoint']}/moto-api/", timeout=5):
        pass
    env = stack_env.read_env_file(state)
    assert json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])["extra"]["endpoint_url"] == info["s3_endpoint"]
    assert env["AIRFLOW__CORE__PARALLELISM"] == "4" and env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert (state / "airflow" / "airflow.db").exists() and env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")

    again = _cli("up", state=state)  # finds the running server instead of starting another
    assert again.returncode == 0, again.stderr
    assert _pids(state) == pids and json.loads((state / "stack.json").read_text())["s3_port"] == info["s3_port"]

    # The process that started the stack has exited (as after a crash); a new one stops it by PID.
    down = _cli("down", state=state)
    assert down.returncode == 0 and "moto" in down.stdout
    assert not psutil.pid_exists(pids["moto"]) or psutil.Process(pids["moto"]).status() == psutil.STATUS_ZOMBIE
    assert not list((state / "pids").glob("*.pid"))

    # S3 starts again empty beside the Airflow database it had: said, not left for a failed run to find
    restarted = _cli("up", state=state)
    try:
        assert restarted.returncode == 0 and "warning: the embedded S3 (moto) keeps its objects in memory" in restarted.stderr
    finally:
        _cli("down", state=state)


def test_down_ignores_stale_and_reused_pids(tmp_path):
    paths = stack.StackPaths(tmp_path)
    paths.pids.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (paths.pids / "gone.pid").write_text(json.dumps({"pid": dead.pid, "create_time": time.time()}))
    me = psutil.Process()
    (paths.pids / "reused.pid").write_text(json.dumps({"pid": me.pid, "create_time": me.create_time() - 3600}))
    assert stack.down(tmp_path) == []
    assert me.is_running()
    assert not list(paths.pids.glob("*.pid"))


def test_stop_process_tree_terminates_children_before_parent(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child_pid = int(parent.stdout.readline())
    stack.stop_process_tree(psutil.Process(parent.pid), timeout=10)
    parent.wait(timeout=10)
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.integration
def test_up_with_airflow_ui_serves_the_dags_and_down_stops_every_process(tmp_path):
    state = tmp_path / "ui"
    api_only = _cli("up", "--services", "api-server", state=state, timeout=400)  # what `demo --keep` leaves
    result = _cli("up", "--airflow", state=state, timeout=400)  # then the whole of Airflow, in its place
    try:
        assert api_only.returncode == 0, api_only.stderr[-3000:]
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((state / "stack.json").read_text())["airflow_mode"] == "standalone"
        assert "Airflow UI:  http://127.0.0.1:" in result.stdout and "login:" in result.stdout
        info = json.loads((state / "stack.json").read_text())
        user, password = next(iter(info["login"].items()))
        request = urllib.request.Request(
            f"{info['airflow_url']}/auth/token",
            data=json.dumps({"username": user, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            token = json.load(response)["access_token"]
        deadline = time.monotonic() + 120
        dags = []
        while time.monotonic() < deadline and "bgremoval_training" not in dags:
            request = urllib.request.Request(f"{info['airflow_url']}/api/v2/dags", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                dags = [d["dag_id"] for d in json.load(response)["dags"]]
            time.sleep(2)
        assert "bgremoval_training" in dags
        tree = [psutil.Process(pid) for pid in _pids(state).values()]
        tree += [c for p in tree for c in p.children(recursive=True)]
        assert len(tree) >= 4  # moto, standalone and its scheduler / api-server / triggerer / dag-processor
    finally:
        _cli("down", state=state)
    time.sleep(1)
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
