#!/usr/bin/env bash
# One entry point for a fresh machine: makes .venv (once), installs fastres with its extension and
# test/train dependencies, then runs what was asked.
#   bash scripts/dev.sh train [ARGS]   python -m fastres.train (the main job)
#   bash scripts/dev.sh test  [ARGS]   python -m pytest (the test suite)
#   bash scripts/dev.sh bench [ARGS]   pytest benchmarks/ --benchmark-only
#   bash scripts/dev.sh install        only the install
# Environment: PYTHON (default python3), FASTRES_BUILD_CUDA (see setup.py), FASTRES_REINSTALL=1.
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
  python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" ninja
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation -e ".[train,test]"
  touch "$stamp"
fi

case "$what" in
  install) python -m fastres.info ;;
  train)   exec python -m fastres.train "$@" ;;
  test)    exec python -m pytest "$@" ;;
  bench)   exec python -m pytest benchmarks/ --benchmark-only "$@" ;;
  *) echo "usage: bash scripts/dev.sh train|test|bench|install [ARGS]" >&2; exit 2 ;;
esac
