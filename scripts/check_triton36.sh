#!/usr/bin/env bash
# Compile every Triton kernel of fastres.kernels with Triton 3.6 (the GPU machines' version), for sm_80
# and sm_90a, with no GPU: the report tool (python -m fastres.kernels.report) run in a second venv; with
# TESTS=1, also run the kernel and backend tests in that venv, through Triton 3.6's interpreter.
#
#   scripts/check_triton36.sh [OUT_DIR]      (default OUT_DIR: .venv-triton36/report)
#   TESTS=1 COMPILE=0 scripts/check_triton36.sh    only the tests
#
# The venv (.venv-triton36/, git-ignored) is made once: torch==2.13.0 triton==3.6.0 numpy pytest, from
# the wheels pip finds on this machine. fastres.kernels is imported from kernels/ through a small
# package root in the venv (fastres/__init__.py empty, fastres/kernels -> kernels/), as setup.py's
# package_dir maps it, without installing the rest of fastres. Environment:
#   PYTHON=python3.11   interpreter the venv is made from
#   FULL=1              every ResNet-50 case (default: the report's --subset, which covers every kernel)
#   DTYPES=bf16,fp16,fp32
#   COMPILE=0           skip the compile check;  TESTS=1  pytest tests/kernels tests/backends in the venv, the
#                       whole fastres imported from this checkout by scripts/build_inplace.py (no extension).
# The torch there is 2.13.0 (CPU), the nearest to the GPU machines' 2.11.0 that this machine's wheels offer
# for a CPU run; numpy is the newest pip finds (>= 2.4: what broke Triton 3.6's interpreter once).
# Exit status: non-zero when any kernel fails to compile, a test fails (or the venv cannot be made).
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
[ "${COMPILE:-1}" = "0" ] || for arch in 80 90; do
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
if [ "${TESTS:-0}" = "1" ]; then
    # A copy of the sources (tracked and new files, no build outputs: this checkout's fastres/_C*.so is
    # built for another torch), imported by the venv through a .pth and a finder, no extension built.
    SRC="$VENV/src"
    rm -rf "$SRC" && mkdir -p "$SRC"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$SRC"
    FASTRES_BUILD_CUDA=0 "$VENV/bin/python" "$SRC/scripts/build_inplace.py" > "$OUT/build_inplace.log" 2>&1 \
        || { echo "check_triton36: build_inplace failed; see $OUT/build_inplace.log" >&2; exit 1; }
    t1=$(date +%s)
    if (cd "$SRC" && "$VENV/bin/python" -m pytest tests/kernels tests/backends -q -p no:cacheprovider); then
        echo "check_triton36: tests passed under $("$VENV/bin/python" -c 'import numpy, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)') in $(( $(date +%s) - t1 )) s"
    else
        status=1
        echo "check_triton36: tests FAILED under Triton 3.6 (interpreter)" >&2
    fi
fi
echo "check_triton36: $(( $(date +%s) - t0 )) s, exit $status"
exit $status
