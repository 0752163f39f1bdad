#!/usr/bin/env bash
# Compile every Triton kernel of fastres.kernels with Triton 3.6 (the GPU machines' version), for sm_80
# and sm_90a, with no GPU: the report tool (python -m fastres.kernels.report) run in a second venv.
#
#   scripts/check_triton36.sh [OUT_DIR]      (default OUT_DIR: .venv-triton36/report)
#
# The venv (.venv-triton36/, git-ignored) is made once: torch==2.13.0 triton==3.6.0 numpy pytest, from
# the wheels pip finds on this machine. fastres.kernels is imported from kernels/ through a small
# package root in the venv (fastres/__init__.py empty, fastres/kernels -> kernels/), as setup.py's
# package_dir maps it, without installing the rest of fastres. Environment:
#   PYTHON=python3.11   interpreter the venv is made from
#   FULL=1              every ResNet-50 case (default: the report's --subset, which covers every kernel)
#   DTYPES=bf16,fp16,fp32
# Exit status: non-zero when any kernel fails to compile (or the venv cannot be made).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-triton36"
OUT="${1:-$VENV/report}"
PY="${PYTHON:-python3.11}"
DTYPES="${DTYPES:-bf16,fp16,fp32}"
SUBSET="--subset"
[ "${FULL:-0}" = "1" ] && SUBSET=""
t0=$(date +%s)

want='import numpy, pytest, torch, triton; assert triton.__version__ == "3.6.0", triton.__version__'
if ! "$VENV/bin/python" -c "$want" 2>/dev/null; then
    echo "check_triton36: making $VENV (torch 2.13.0, triton 3.6.0)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0 triton==3.6.0 numpy pytest 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "$want"
fi

PKG="$VENV/pkgroot"
mkdir -p "$PKG/fastres"
: > "$PKG/fastres/__init__.py"
ln -sfn "$ROOT/kernels" "$PKG/fastres/kernels"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

status=0
for arch in 80 90; do
    log="$OUT/sm_$arch.txt"
    # run from the package root: from the repository, ./fastres (without kernels/) would come first
    if (cd "$PKG" && TRITON_INTERPRET=0 TRITON_CACHE_DIR="$VENV/triton-cache" PYTHONPATH="$PKG" \
        "$VENV/bin/python" -m fastres.kernels.report --out "$OUT/sm_$arch" --arch "$arch" --dtype "$DTYPES" \
        $SUBSET > "$log" 2> "$log.err"); then
        echo "check_triton36: sm_$arch: $(tail -n 1 "$log")"
    else
        rc=$?
        status=1
        echo "check_triton36: sm_$arch FAILED (exit $rc); see $log and $log.err" >&2
        grep -h "^FAILED\|Error\|error" "$log.err" | tail -n 20 >&2 || tail -n 20 "$log.err" >&2
    fi
done
echo "check_triton36: $(( $(date +%s) - t0 )) s, exit $status"
exit $status
