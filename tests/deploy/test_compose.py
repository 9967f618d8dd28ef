"""docker-compose.yaml, Dockerfile and .env.example are consistent with each other and with the code.

No Docker engine is needed: the compose file is parsed with PyYAML (merge keys included), its
``${VAR}`` references are resolved with the values of .env.example the way Compose does, and every
command an Airflow container runs is parsed by Airflow's own CLI parser. tests/integration/
test_celery_postgres.py runs the same executor configuration for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

AIRFLOW_SERVICES = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker": ["celery", "worker"],
}
ONE_SHOT = {"airflow-init", "minio-init"}
REQUIRED_SERVICES = {*AIRFLOW_SERVICES, *ONE_SHOT, "postgres", "redis", "minio", "mlflow"}
# Secrets .env.example leaves empty on purpose: the operator generates them (commands at its top).
GENERATED = {"AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY"}

# Environment variables the code reads (found by scanning tasks/, plugins/, dags/) that the Airflow
# containers must get from the compose file, and those that they must not need, with the reason.
PRODUCTION_ENV = {"MLFLOW_TRACKING_URI", "BGREMOVAL_CACHE"}
NOT_FROM_COMPOSE = {
    "AWS_ACCESS_KEY_ID": "the bgremoval CLI's S3 keys (the tools service sets them); tasks use aws_default",
    "AWS_SECRET_ACCESS_KEY": "as AWS_ACCESS_KEY_ID",
    "AWS_DEFAULT_REGION": "as AWS_ACCESS_KEY_ID",
    "AWS_ENDPOINT_URL": "as AWS_ACCESS_KEY_ID",
    "AWS_ENDPOINT_URL_S3": "as AWS_ACCESS_KEY_ID",
    "BGREMOVAL_STATE": "the embedded stack's state folder",
    "BGREMOVAL_MLFLOW_ARTIFACTS": "optional artifact root of new experiments; the MLflow server's --artifacts-destination applies",
    "AIRFLOW__API__BASE_URL": "written by the embedded stack; compose sets it for every Airflow service",
    "AIRFLOW__API__HOST": "written by the embedded stack",
    "AIRFLOW__API__PORT": "written by the embedded stack",
    "RANK": "set by torchrun / Horovod / TorchDistributor for each training process",
    "LOCAL_RANK": "as RANK",
    "WORLD_SIZE": "as RANK",
    "OMP_NUM_THREADS": "set by the launcher for its training processes",
    "PYTHONPATH": "passed on to training processes",
    "PATH": "system",
    "USER": "system",
    "JAVA_HOME": "pyspark (local Spark runs only)",
    "PYSPARK_PYTHON": "pyspark (local Spark runs only)",
    "PYSPARK_DRIVER_PYTHON": "pyspark (local Spark runs only)",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "set by the Horovod backend itself",
    "BGREMOVAL_PRETRAINED_DIR": "where the published U2-NetP weights are kept; the image sets it and fetches them at build",
    "U2NET_HOME": "rembg's model folder, looked at first for the published weights when a user has rembg",
    "BGREMOVAL_SYSTEM_MALLOC": "opt-out of keeping freed memory in the heap for PyTorch on the CPU; unset by default",
    "BGREMOVAL_PROGRESS_REDRAW": "set by `bgremoval train` for its workers when it shows their bars on a terminal",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "set off by `bgremoval remove --quiet`; MLflow's own default otherwise",
}


# ------------------------------------------------------------------------------ loading


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a Compose ``.env`` file: ``KEY=value`` lines, ``#`` comments, quoted values literal."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not a KEY=value line in {path.name}: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        values[key] = value
    return values


_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def references(text: str) -> dict[str, str | None]:
    """``{name: operator}`` of every ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` (``$$`` is an escape)."""
    found = {}
    for match in _REF.finditer(text):
        if match.group(1):
            found.setdefault(match.group(1), match.group(2))
            if match.group(2) in (":?", "?"):
                found[match.group(1)] = match.group(2)
    return found


def interpolate(value, env: dict[str, str]):
    """Resolve ``${...}`` in every string of ``value`` as Compose does; ``$$`` becomes ``$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if (current if op == ":-" else current is not None) else arg
        if op in (":?", "?") and not current:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return current or ""

    return _REF.sub(replace, value)


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    env = read_env_file(ENV_EXAMPLE)
    # What the operator generates (see .env.example): stand-ins so required references resolve.
    return {**env, **{name: f"generated-{name.lower()}" for name in GENERATED}}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(raw, example_env) -> dict:
    return interpolate(raw["services"], example_env)


def env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def command_of(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def code_env_names() -> set[str]:
    """Environment variable names read in tasks/, plugins/ and dags/ (os.environ / getenv / env.get)."""
    pattern = re.compile(r"(?:environ|env|getenv)(?:\.get|\.setdefault|\.pop)?\s*[\(\[]\s*[\"']([A-Z][A-Z0-9_]+)[\"']")
    names = set()
    for folder in ("tasks", "plugins", "dags"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            names.update(pattern.findall(text))
            names.update(re.findall(r"[\"']([A-Z][A-Z0-9_]+)[\"']\s+(?:not\s+)?in\s+os\.environ", text))
    return names


def code_connection_ids() -> set[str]:
    """Airflow connection ids the DAGs and plugins use (``*_CONN_ID = "..."`` constants)."""
    ids = set()
    for path in [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "dags").rglob("*.py")]:
        ids.update(re.findall(r"\b[A-Z_]*CONN_ID\s*=\s*[\"']([a-z0-9_]+)[\"']", path.read_text()))
    return ids


def shell_airflow_calls(script: str) -> list[list[str]]:
    """The arguments of every ``airflow ...`` command in a shell script (not inside heredocs)."""
    import shlex

    calls, heredoc = [], None
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        marker = re.search(r"<<-?\s*'?(\w+)'?", line)
        heredoc = marker.group(1) if marker else None
        for segment in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(segment, comments=True) if segment.strip() else []
            if words[:1] == ["airflow"]:
                calls.append(words[1:])
    return calls


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", line))
    return env


# ------------------------------------------------------------------------------ the compose file


def test_every_required_service_is_there_with_an_image_or_a_build(raw, services):
    assert REQUIRED_SERVICES <= set(services), REQUIRED_SERVICES - set(services)
    project_image = services["airflow-scheduler"]["image"]
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        if service.get("build"):
            build = service["build"]
            context = ROOT / build.get("context", ".")
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert service.get("image") == project_image, f"{name} builds the project image under another tag"
        else:
            image = service["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
    # Every Airflow component and the MLflow server run the project's image (same dependencies).
    for name in [*AIRFLOW_SERVICES, "airflow-init", "mlflow"]:
        assert services[name]["image"] == project_image and services[name].get("build"), name


def test_airflow_services_run_their_component_with_the_celery_executor_on_postgres_and_redis(services):
    reference = env_of(services["airflow-scheduler"])
    for name, subcommand in AIRFLOW_SERVICES.items():
        service = services[name]
        assert command_of(service)[:1 + len(subcommand)] == ["airflow", *subcommand], name
        env = env_of(service)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        # The settings every component must share are the same everywhere.
        for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
                    "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW_CONN_AWS_DEFAULT", "MLFLOW_TRACKING_URI"):
            assert env.get(key) and env[key] == reference[key], (name, key)

    env = reference
    db = urlparse(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert db.scheme == "postgresql+psycopg2" and db.hostname == "postgres" and db.hostname in services
    postgres_env = env_of(services["postgres"])
    assert (db.username, db.password, db.path.lstrip("/")) == (
        postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], postgres_env["POSTGRES_DB"])
    result = urlparse(env["AIRFLOW__CELERY__RESULT_BACKEND"])
    assert result.scheme == "db+postgresql" and result.netloc == db.netloc and result.path == db.path
    broker = urlparse(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and (broker.port or 6379) == 6379

    # Workers reach the execution API on the api-server's container port.
    execution = urlparse(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    api_command = command_of(services["airflow-apiserver"])
    api_port = int(api_command[api_command.index("--port") + 1]) if "--port" in api_command else 8080
    assert execution.hostname == "airflow-apiserver" and execution.port == api_port and execution.path == "/execution/"
    published = [str(p) for p in services["airflow-apiserver"].get("ports", [])]
    assert any(p.endswith(f":{api_port}") for p in published), published

    init = services["airflow-init"]
    assert "airflow db migrate" in " ".join(command_of(init)), "the init job must migrate the database"
    assert env_of(init)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


def test_airflow_commands_and_health_checks_are_valid_airflow_cli_calls(services, tmp_path):
    """Parse every ``airflow ...`` command line of the compose file with Airflow's own CLI parser
    (with the CeleryExecutor configured, so the ``celery`` commands exist)."""
    calls = []
    for service in services.values():
        command = command_of(service)
        if command[:1] == ["airflow"]:
            calls.append(command[1:])
        elif command[:2] == ["bash", "-c"]:
            calls.extend(shell_airflow_calls(command[2]))
        test = [str(part) for part in (service.get("healthcheck") or {}).get("test", [])]
        if test[:1] == ["CMD-SHELL"]:
            calls.extend(shell_airflow_calls(" ".join(test[1:])))
        elif test[:2] == ["CMD", "airflow"]:
            calls.append(test[2:])
    assert ["db", "migrate"] in calls and ["celery", "worker"] in calls
    script = (
        "import json, sys\n"
        "from airflow.cli.cli_parser import get_parser\n"
        "parser = get_parser()\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    parser.parse_args(argv)\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(calls)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (calls, result.stderr[-3000:])


def test_the_shell_scripts_of_the_compose_file_are_valid_bash_and_python(services):
    """The init job's script (bash with a Python heredoc) and the MinIO job's script parse."""
    script = command_of(services["airflow-init"])[2]
    assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0
    heredoc = re.search(r"python - <<'PY'\n(.*?)\nPY\n", script, re.S)
    assert heredoc, "the init job creates MLflow's database and the logins in a Python heredoc"
    compile(heredoc.group(1), "airflow-init", "exec")
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MLFLOW_DB", "AIRFLOW_ADMIN_PASSWORD",
                 "AIRFLOW_OPERATOR_PASSWORD", "AIRFLOW_REVIEWER_PASSWORD"):
        assert f'os.environ["{name}"]' in heredoc.group(1) and env_of(services["airflow-init"])[name], name
    users = env_of(services["airflow-apiserver"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert {u.split(":")[0] for u in users.split(",")} == {"admin", "operator", "reviewer"}
    minio_init = services["minio-init"]
    assert minio_init["entrypoint"] == ["/bin/sh", "-c"]
    assert subprocess.run(["sh", "-n", "-c", command_of(minio_init)[0]], capture_output=True).returncode == 0


def test_the_worker_health_check_names_an_importable_celery_app(services):
    test = " ".join(services["airflow-worker"]["healthcheck"]["test"])
    app = re.search(r"--app\s+(\S+)", test).group(1)
    assert 'celery@${HOSTNAME}' in test  # $$ in the file: the container's shell expands it
    module, _, attribute = app.rpartition(".")
    script = f"import importlib; assert hasattr(importlib.import_module({module!r}), {attribute!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{app} does not import: {result.stderr[-1500:]}"


def test_the_environment_the_code_reads_is_set_for_production(services):
    found = code_env_names()
    unclassified = found - PRODUCTION_ENV - set(NOT_FROM_COMPOSE)
    assert not unclassified, (
        f"the code reads {sorted(unclassified)}: set them in docker-compose.yaml (add to PRODUCTION_ENV) "
        "or say in NOT_FROM_COMPOSE why production does not need them")
    assert PRODUCTION_ENV <= found
    for name in ("airflow-worker", "airflow-triggerer", "airflow-scheduler", "airflow-apiserver", "airflow-dag-processor"):
        env = env_of(services[name])
        for key in PRODUCTION_ENV:
            assert env.get(key), (name, key)
        for conn_id in code_connection_ids():
            assert f"AIRFLOW_CONN_{conn_id.upper()}" in env, (name, conn_id)
    worker = env_of(services["airflow-worker"])
    assert urlparse(worker["MLFLOW_TRACKING_URI"]).hostname == "mlflow"
    assert worker["BGREMOVAL_CACHE"].startswith("/opt/airflow/")

    # aws_default points at MinIO in the example, with the services' own user (never the root login).
    conn = json.loads(worker["AIRFLOW_CONN_AWS_DEFAULT"])
    minio, minio_init = env_of(services["minio"]), env_of(services["minio-init"])
    assert conn["conn_type"] == "aws"
    assert (conn["login"], conn["password"]) == (minio_init["BGREMOVAL_S3_ACCESS_KEY"], minio_init["BGREMOVAL_S3_SECRET_KEY"])
    assert conn["login"] != minio["MINIO_ROOT_USER"]
    assert urlparse(conn["extra"]["endpoint_url"]).hostname == "minio"
    # The tools service gives the bgremoval CLI the S3 settings it reads.
    cli = env_of(services["airflow-cli"])
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(cli)


def test_mlflow_server_keeps_runs_in_postgres_and_artifacts_in_minio(services):
    mlflow = services["mlflow"]
    command = command_of(mlflow)
    assert command[:2] == ["mlflow", "server"]
    options = dict(part[2:].split("=", 1) for part in command[2:] if part.startswith("--") and "=" in part)
    backend = urlparse(options["backend-store-uri"])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    assert "--serve-artifacts" in command
    destination = urlparse(options["artifacts-destination"])
    assert destination.scheme == "s3"
    assert "mlflow" in options["allowed-hosts"].split(","), "workers call it by its service name"
    env = env_of(mlflow)
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    port = int(options["port"])
    assert urlparse(env_of(services["airflow-worker"])["MLFLOW_TRACKING_URI"]).port == port
    # Its database is created by the init job, its bucket by the MinIO job, before it starts.
    init_script = " ".join(command_of(services["airflow-init"]))
    assert "CREATE DATABASE" in init_script and env_of(services["airflow-init"])["MLFLOW_DB"] == backend.path.lstrip("/")
    bucket_script = " ".join(command_of(services["minio-init"]))
    assert "mc mb" in bucket_script and "MLFLOW_BUCKET" in bucket_script and "BGREMOVAL_BUCKET" in bucket_script
    assert env_of(services["minio-init"])["MLFLOW_BUCKET"] == destination.hostname
    assert depends_on(mlflow)["airflow-init"] == depends_on(mlflow)["minio-init"] == "service_completed_successfully"


def test_airflow_services_mount_dags_and_plugins_where_the_image_looks_for_them(services):
    image_env = dockerfile_env()
    dags, plugins = image_env["AIRFLOW__CORE__DAGS_FOLDER"], image_env["AIRFLOW__CORE__PLUGINS_FOLDER"]
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        mounts = {}
        for volume in services[name].get("volumes", []):
            source, target = str(volume).split(":")[:2]
            mounts[target] = source
        assert mounts.get(dags) == "./dags" and mounts.get(plugins) == "./plugins", (name, mounts)
        env = env_of(services[name])
        assert env.get("AIRFLOW__CORE__DAGS_FOLDER", dags) == dags and env.get("AIRFLOW__CORE__PLUGINS_FOLDER", plugins) == plugins
    assert (ROOT / "dags" / "bgremoval_training.py").is_file() and (ROOT / "plugins" / "bgremoval_plugin.py").is_file()
    # The simple auth manager's passwords file lies on the volume the init job writes.
    passwords = env_of(services["airflow-apiserver"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    for name in ("airflow-apiserver", "airflow-init"):
        targets = [str(v).split(":")[1] for v in services[name]["volumes"]]
        assert any(passwords.startswith(t.rstrip("/") + "/") for t in targets), name


def test_every_service_has_a_health_check_and_waits_for_what_it_needs(raw, services):
    volumes = set(raw.get("volumes") or {})
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        tool = "tools" in (service.get("profiles") or [])
        if one_shot:
            assert name in ONE_SHOT or tool, f"{name} does not restart: only one-shot jobs and tools may"
        else:
            check = service.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{name} has no health check"
            assert check.get("interval") and check.get("retries"), name
        for dependency, condition in depends_on(service).items():
            assert dependency in services, (name, dependency)
            if dependency in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dependency)
            else:
                assert condition == "service_healthy" and services[dependency].get("healthcheck"), (name, dependency)
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} uses the undeclared volume {source}"
    # Each one-shot job is awaited by a service (it exists for them).
    awaited = {dep for s in services.values() for dep, cond in depends_on(s).items() if cond == "service_completed_successfully"}
    assert ONE_SHOT <= awaited
    # The scheduler's health check needs its health server, on the port it polls.
    scheduler = services["airflow-scheduler"]
    assert env_of(scheduler)["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"].lower() == "true"
    assert "8974/health" in " ".join(scheduler["healthcheck"]["test"])
    api_check = " ".join(services["airflow-apiserver"]["healthcheck"]["test"])
    assert "/api/v2/monitor/health" in api_check
    worker = services["airflow-worker"]
    assert depends_on(worker)["airflow-apiserver"] == "service_healthy"  # workers need the execution API


def test_every_variable_the_compose_file_uses_is_documented_in_env_example(raw):
    used = references(COMPOSE.read_text())
    example = read_env_file(ENV_EXAMPLE)
    text = ENV_EXAMPLE.read_text()
    undocumented = sorted(set(used) - set(example))
    assert not undocumented, f"add these to .env.example with a comment: {undocumented}"
    for name, op in used.items():
        # Each has a comment within the block above it.
        block = text.split(f"\n{name}=")[0].rsplit("\n\n", 1)[-1]
        assert "#" in block, f"{name} has no comment in .env.example"
        if op in (":?", "?"):
            assert example[name] or name in GENERATED, f"{name} is required but empty in .env.example"
    for name in GENERATED:
        assert example[name] == "" and f"s|^{name}=" in text, f"{name}: .env.example must say how to generate it"
    # The example's values resolve every reference.
    interpolate(raw, {**example, **{n: "x" for n in GENERATED}})


# ------------------------------------------------------------------------------ the Dockerfile


def test_dockerfile_installs_cpu_torch_first_then_the_pinned_project_and_copies_the_code():
    text = DOCKERFILE.read_text()
    joined = text.replace("\\\n", " ")
    assert re.search(r"^FROM (python:3\.11|apache/airflow:3\.3\.2-python3\.11)", text, re.M)
    constraints = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    torch_arg = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    assert torch_arg == constraints["torch"]
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    torch_at = joined.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    project_at = joined.index('pip install -c constraints.txt ".[airflow,openvino]"')  # Airflow, torch and OpenVINO
    assert torch_at < project_at
    for source in ("pyproject.toml", "constraints.txt", "tasks/", "dags/", "plugins/"):
        assert re.search(rf"^COPY (--chown=\S+ )?.*\b{re.escape(source)}", text, re.M), source
    assert "ARG WITH_HOROVOD=false" in text and "scripts/install-horovod.sh" in text
    # The Dockerfile's Python satisfies the project's requires-python.
    assert ">=3.11" in (ROOT / "pyproject.toml").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".env", ".bgremoval"} <= set(ignored)



def test_the_init_jobs_refuse_change_me_secrets_and_services_get_scoped_users(services, example_env):
    init_script = command_of(services["airflow-init"])[2]
    check = re.search(r"(for name in .*?done)\n", init_script, re.S).group(1)
    env = env_of(services["airflow-init"])
    real = {k: v.replace("change-me", "s3cr3t") for k, v in env.items()}
    assert subprocess.run(["bash", "-c", check], env={**os.environ, **real}, capture_output=True).returncode == 0
    refused = subprocess.run(["bash", "-c", check], env={**os.environ, **real, "POSTGRES_PASSWORD": "change-me-postgres"},
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "POSTGRES_PASSWORD" in refused.stderr
    assert any("change-me" in v for v in env.values())  # the example's placeholders would be refused

    minio_script = command_of(services["minio-init"])[0]
    assert "mc admin user add" in minio_script and "mc admin policy attach" in minio_script
    assert "*change-me*" in minio_script
    mlflow = env_of(services["mlflow"])
    assert mlflow["AWS_ACCESS_KEY_ID"] == env_of(services["minio-init"])["MLFLOW_ARTIFACTS_ACCESS_KEY_ID"]
    assert mlflow["AWS_ACCESS_KEY_ID"] != env_of(services["minio"])["MINIO_ROOT_USER"]


def test_mlflow_minio_and_flower_listen_on_loopback_unless_told_otherwise(services):
    for name in ("mlflow", "minio", "flower"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
