#!/usr/bin/env bash
# One entry point for a fresh machine: makes .venv (once), installs fastres with its extension and
# test/train dependencies, then runs what was asked.
#   bash scripts/dev.sh train [ARGS]   python -m fastres.train (the main job)
#   bash scripts/dev.sh test  [ARGS]   python -m pytest (the test suite)
#   bash scripts/dev.sh bench [ARGS]   pytest benchmarks/ --benchmark-only
#   bash scripts/dev.sh install        only the install
# Environment: PYTHON (default python3), FASTRES_BUILD_CUDA (see setup.py), FASTRES_REINSTALL=1,
#   FASTRES_TORCH_INDEX=URL   take torch and torchvision from that package index instead of the default
#                             (e.g. PyTorch's CPU-only index https://download.pytorch.org/whl/cpu: about
#                             1 GB instead of 6 GB, and no CUDA extension, since that torch has no CUDA).
# The first call says what it installs and how long each part took; later calls install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"; shift || true

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.fastres-installed
if [ ! -f "$stamp" ] || [ "${FASTRES_REINSTALL:-0}" = 1 ] || [ setup.py -nt "$stamp" ] \
   || [ -n "$(find csrc -newer "$stamp" -type f 2>/dev/null | head -n 1)" ]; then
  t0=$(date +%s)
  index=() build="the default CUDA 13 build: about 6 GB with its CUDA libraries; minutes on a first install"
  if [ -n "${FASTRES_TORCH_INDEX:-}" ]; then
    index=(--index-url "$FASTRES_TORCH_INDEX") build="from $FASTRES_TORCH_INDEX"
  fi
  echo "dev.sh: [1/2] torch 2.14.1 and torchvision 0.29.1 into .venv ($build)"
  python -m pip install --quiet --disable-pip-version-check "${index[@]}" "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install --quiet --disable-pip-version-check ninja
  t1=$(date +%s)
  echo "dev.sh: [1/2] done in $((t1 - t0)) s; [2/2] fastres (editable, with its train and test extras)" \
       "and its extensions: fastres._cpu (a C++ compiler present), fastres._C (nvcc present; compiling" \
       "takes a few minutes on 2 cores)"
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation -e ".[train,test]"
  touch "$stamp"
  echo "dev.sh: [2/2] done in $(( $(date +%s) - t1 )) s; .venv is $(du -sh .venv 2>/dev/null | cut -f1)"
fi

case "$what" in
  install) python -m fastres.info ;;
  train)   exec python -m fastres.train "$@" ;;
  test)    exec python -m pytest "$@" ;;
  bench)   exec python -m pytest benchmarks/ --benchmark-only "$@" ;;
  *) echo "usage: bash scripts/dev.sh train|test|bench|install [ARGS]" >&2; exit 2 ;;
esac
