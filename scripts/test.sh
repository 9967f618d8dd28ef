#!/usr/bin/env bash
# Run the test suite with the project's environment. Extra arguments go to pytest (they win over
# the ones here: `-n 0` runs everything in this one process, e.g. under a debugger).
# Two pytest-xdist workers take whole files (--dist loadfile); each starts its own servers (moto,
# Airflow's metadata DB and api-server, MLflow store) in its own temporary folder. The long
# pipelines keep one core busy and the other mostly idle: side by side on 2 cores the suite took
# 635-680 s against 860-866 s in one process (separate runs). BGREMOVAL_TEST_WORKERS changes the number of workers.
set -euo pipefail
cd "$(dirname "$0")/.."
export AIRFLOW__CORE__PARALLELISM=4 AIRFLOW__CORE__LOAD_EXAMPLES=False PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q --durations=15 -n "${BGREMOVAL_TEST_WORKERS:-2}" --dist loadfile "$@"
