#!/usr/bin/env bash
# Run the test suite with the project's environment. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export AIRFLOW__CORE__PARALLELISM=4 AIRFLOW__CORE__LOAD_EXAMPLES=False PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q --durations=15 "$@"
