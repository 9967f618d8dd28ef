#!/usr/bin/env bash
# Install Horovod 0.28.1 (PyTorch + Gloo, CPU collectives, no MPI/TensorFlow/MXNet) into .venv.
#
# PyPI has no Horovod wheel, and the 0.28.1 sdist does not compile against torch 2.13 as it is
# (its CMake files ask for C++14; torch's headers need C++17). This script:
#   1. exits at once when `import horovod.torch` already works in .venv;
#   2. else installs a wheel built earlier, from
#      ${BGREMOVAL_WHEEL_CACHE:-~/.cache/bgremoval/wheels}/horovod-0.28.1-torch-<torch>-<python>-<arch>/
#      (the extension is linked against one torch build, hence the torch version in the name);
#   3. else downloads the sdist, raises CMAKE_CXX_STANDARD to 17, builds a wheel without build
#      isolation (against the venv's torch), stores it in that cache folder and installs it.
# Needs: .venv with torch (scripts/install.sh), gcc/g++ >= 9, make, cmake >= 3.13 (pip's cmake
# package is fetched into a temporary folder when the system has none), Python headers.
# With --build-only it stops after step 3's wheel is in the cache and installs nothing into .venv
# (scripts/install.sh runs it so in the background while the other dependencies download; the
# build needs torch and packaging in .venv already).
# Environment: BGREMOVAL_WHEEL_CACHE (cache root), HOROVOD_BUILD_JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
build_only=0
[ "${1:-}" = "--build-only" ] && build_only=1

HOROVOD_VERSION=0.28.1
PY=.venv/bin/python
started=$(date +%s)

if [ ! -x "$PY" ]; then
  echo "install-horovod: no .venv here; run scripts/install.sh (make install) first" >&2
  exit 1
fi
if "$PY" -c "import horovod.torch" >/dev/null 2>&1; then
  echo "install-horovod: horovod $("$PY" -c 'import horovod; print(horovod.__version__)') is already installed in .venv"
  exit 0
fi
if ! torch_version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "install-horovod: torch is not importable from .venv; run scripts/install.sh first" >&2
  exit 1
fi
py_tag=$("$PY" -c "import sys; print(f'cp{sys.version_info.major}{sys.version_info.minor}')")
cache_root=${BGREMOVAL_WHEEL_CACHE:-$HOME/.cache/bgremoval/wheels}
cache_dir="$cache_root/horovod-$HOROVOD_VERSION-torch-$torch_version-$py_tag-$(uname -m)"
PIP=("$PY" -m pip --disable-pip-version-check)

if [ "$build_only" = 0 ]; then
  # Runtime dependencies of Horovod (also imported by its setup.py), pinned like the rest of the venv.
  "${PIP[@]}" install -q -c constraints.txt packaging cloudpickle psutil pyyaml
fi

elapsed() { echo "$(( $(date +%s) - started )) s"; }

install_wheel() {
  "${PIP[@]}" install -q --no-deps --force-reinstall "$1"
  if ! "$PY" -c "import horovod.torch" ; then
    echo "install-horovod: $1 is installed but 'import horovod.torch' fails (see above); delete $cache_dir and rerun" >&2
    exit 1
  fi
}

shopt -s nullglob
cached=("$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl)
shopt -u nullglob
if [ ${#cached[@]} -gt 0 ] && [ "$build_only" = 1 ]; then
  echo "install-horovod: the wheel is already in the cache: ${cached[0]}"
  exit 0
fi
if [ ${#cached[@]} -gt 0 ]; then
  echo "install-horovod: installing the cached wheel ${cached[0]}"
  install_wheel "${cached[0]}"
  echo "install-horovod: done in $(elapsed) (from the cache)"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/bgremoval-horovod.XXXXXX")
trap 'rm -rf "$work"' EXIT

# cmake >= 3.13 (Horovod's minimum); below 4 because bundled third-party CMake files are old.
cmake_ok() {
  command -v cmake >/dev/null 2>&1 || return 1
  local version
  version=$(cmake --version | head -n1 | sed -E 's/^cmake version ([0-9]+\.[0-9]+).*/\1/')
  "$PY" -c "import sys; v = tuple(map(int, '$version'.split('.'))); sys.exit(0 if (3, 13) <= v < (4, 0) else 1)"
}
if ! cmake_ok; then
  echo "install-horovod: no usable system cmake (3.13 <= version < 4); fetching pip's cmake into $work/cmake"
  "${PIP[@]}" install -q --target "$work/cmake" "cmake>=3.13,<4"
  export PYTHONPATH="$work/cmake${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$work/cmake/bin:$PATH"
  cmake_ok || { echo "install-horovod: cmake from pip does not run" >&2; exit 1; }
fi
for tool in gcc g++ make; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-horovod: $tool is missing (apt-get install build-essential)" >&2; exit 1; }
done
include_dir=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
if [ ! -f "$include_dir/Python.h" ]; then
  echo "install-horovod: Python headers missing ($include_dir/Python.h); install the python3-dev package" >&2
  exit 1
fi

echo "install-horovod: downloading the horovod==$HOROVOD_VERSION sdist"
"${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work/sdist"
sdist=$(ls "$work"/sdist/horovod-"$HOROVOD_VERSION".tar.gz)
tar -xzf "$sdist" -C "$work"
src="$work/horovod-$HOROVOD_VERSION"

# torch 2.13's headers need C++17: raise every CMAKE_CXX_STANDARD the build sets.
for file in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
  if ! grep -Eq 'CMAKE_CXX_STANDARD[[:space:]]+1[14]\b' "$file"; then
    echo "install-horovod: no 'CMAKE_CXX_STANDARD 11|14' line in $file: the sdist changed, update this script" >&2
    exit 1
  fi
  sed -E -i 's/(CMAKE_CXX_STANDARD[[:space:]]+)1[14]\b/\117/' "$file"
  if grep -Eq 'CMAKE_CXX_STANDARD[[:space:]]+1[14]\b' "$file" || ! grep -Eq 'CMAKE_CXX_STANDARD[[:space:]]+17\b' "$file"; then
    echo "install-horovod: could not set CMAKE_CXX_STANDARD to 17 in $file" >&2
    exit 1
  fi
done

# No debug info in the RelWithDebInfo build setup.py asks for (-O3 stays): a smaller wheel, a
# faster build of the files that include torch's headers.
cmake_main="$src/CMakeLists.txt"
anchor='string(REPLACE "-O2" "-O3" CMAKE_CXX_FLAGS_RELWITHDEBINFO "${CMAKE_CXX_FLAGS_RELWITHDEBINFO}")'
if ! grep -qF "$anchor" "$cmake_main"; then
  echo "install-horovod: no '$anchor' line in $cmake_main: the sdist changed, update this script" >&2
  exit 1
fi
sed -i 's/^string(REPLACE "-O2" "-O3" CMAKE_\(C\|CXX\)_FLAGS_RELWITHDEBINFO .*$/&\nstring(REPLACE "-g" "" CMAKE_\1_FLAGS_RELWITHDEBINFO "${CMAKE_\1_FLAGS_RELWITHDEBINFO}")/' "$cmake_main"

jobs=${HOROVOD_BUILD_JOBS:-$(nproc)}
echo "install-horovod: building the wheel against torch $torch_version with $jobs jobs (several minutes)"
build_started=$(date +%s)
unset HOROVOD_GPU HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST
env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO \
    MAKEFLAGS="-j$jobs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$work/wheel" "$src" >"$work/build.log" 2>&1 || {
  echo "install-horovod: the build failed; last lines of the log:" >&2
  tail -n 60 "$work/build.log" >&2
  exit 1
}
echo "install-horovod: wheel built in $(( $(date +%s) - build_started )) s"

wheel=$(ls "$work"/wheel/horovod-"$HOROVOD_VERSION"-*.whl)
mkdir -p "$cache_dir"
cp "$wheel" "$cache_dir.tmp.$$" && mv "$cache_dir.tmp.$$" "$cache_dir/$(basename "$wheel")"
echo "install-horovod: cached $cache_dir/$(basename "$wheel")"
if [ "$build_only" = 1 ]; then
  echo "install-horovod: built in $(elapsed); not installed (--build-only)"
  exit 0
fi
install_wheel "$cache_dir/$(basename "$wheel")"
echo "install-horovod: done in $(elapsed)"
