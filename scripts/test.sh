#!/usr/bin/env bash
# Run the test suite with the project's environment. Extra arguments go to pytest.
#
# With no arguments (`make test`) the in-process unit tier runs beside the other tiers, which spend
# much of their time waiting on servers and child processes; each tier prints its own summary and
# the script fails when either does.
set -euo pipefail
cd "$(dirname "$0")/.."
export AIRFLOW__CORE__PARALLELISM=4 AIRFLOW__CORE__LOAD_EXAMPLES=False PYTHONUNBUFFERED=1
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ "$#" -gt 0 ]; then
  exec "${PYTEST[@]}" --durations=15 "$@"
fi
unit_log=$(mktemp)
trap 'rm -f "$unit_log"' EXIT
"${PYTEST[@]}" --durations=5 -m unit >"$unit_log" 2>&1 &
unit_pid=$!
status=0
echo "== process and integration tiers (the unit tier runs alongside; its report follows)"
"${PYTEST[@]}" --durations=15 -m "not unit" || status=$?
wait "$unit_pid" || status=$?
echo "== unit tier"
cat "$unit_log"
exit "$status"
