#!/usr/bin/env bash
# fastres on a lent GPU machine: build, GPU tests, training parity, benchmarks, summary.
#
#   scripts/gpu_check.sh STAGE [STAGE ...]
#
# Stages (each fits one 10-minute command; run them as separate commands where time is counted):
#   build         pip install --no-build-isolation --no-deps -e . with FASTRES_BUILD_CUDA=1 (no network needed)
#   tests         pytest -m "gpu and not slow" over tests/ (kernel and op tests on the GPU)
#   parity        GPU training parity: pytest tests/test_parity.py -m gpu (ResNet-50 bf16 + fp32 50 steps,
#                 ResNet-20 200 steps, each available backend); one JSON per run
#   bench-models  ResNet-50 then ResNet-18: training step and inference (batch 1, 32, 256)
#   bench-blocks  Bottleneck / BasicBlock, training step and inference
#   bench-ops     every ResNet-50 conv shape: training forward, forward+backward, inference, BN+add+ReLU
#   summary       summary.md from everything in the results folder
#   all           build tests parity bench-models bench-blocks bench-ops summary
#   quick         build, then a short smoke run of everything (minutes; figures not for the record)
# Suggested order for a 30-minute budget: "build tests", "parity", "bench-models summary",
# "bench-ops summary", "bench-blocks summary".
#
# Every benchmark row times fastres and its baseline (eager, compile) alternately in one test and records
# both medians and their ratio (fastres/bench_timing.py).
# Results go to benchmarks/results/<date>-<gpu>/ (RESULTS_DIR overrides): raw pytest-benchmark JSON,
# parity JSON, one log per stage, summary.md. When $OUT is set (the device runner's output folder)
# the results folder is copied there after every stage.
# Time limits per stage, in seconds: STAGE_TIMEOUT (default 540). Python: PYTHON (default python3).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${STAGE_TIMEOUT:-540}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
RESULTS=${RESULTS_DIR:-benchmarks/results/$(date -u +%Y-%m-%d)-${GPU:-nogpu}}
mkdir -p "$RESULTS"
STATUS=0

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

publish() {
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        mkdir -p "$OUT/results" && cp -r "$RESULTS" "$OUT/results/"
    fi
}

# run NAME CMD...: CMD under the stage time limit, output to the terminal and $RESULTS/NAME.log
run() {
    local name=$1; shift
    say "$name: $*"
    timeout --signal=INT --kill-after=20 "$LIMIT" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "exit status $rc" >> "$RESULTS/$name.log"
    [ "$rc" -eq 124 ] && say "$name: stopped at the ${LIMIT}s limit"
    [ "$rc" -ne 0 ] && STATUS=1
    say "$name: exit status $rc"
    publish
    return 0
}

env_info() {
    {
        nvidia-smi 2>&1 | head -15
        $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
        $PY -c "import triton; print('triton', triton.__version__)" 2>&1
        $PY -c "import fastres.backend as b; [print(n, b.available(n)) for n in ('triton', 'cuda')]" 2>&1
        $PY -m fastres.bench.environment 2>&1  # the description every benchmark / parity JSON carries
        git rev-parse HEAD 2>/dev/null
    } > "$RESULTS/environment.txt"
}

build() {
    # --no-deps: no network; torch, triton, pytest are already installed there.
    # A system Python may refuse a plain install (PEP 668): then --user, then --break-system-packages.
    local pip="FASTRES_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e ."
    if [ -n "$(ls csrc/*.cu csrc/*.cpp 2>/dev/null)" ]; then
        run build bash -c "$pip || $pip --user || $pip --break-system-packages"
    else
        say "build: csrc/ has no sources; installing without the extension"
        run build bash -c "FASTRES_BUILD_CUDA=0 $PY -m pip install --no-build-isolation --no-deps -e ."
    fi
    env_info
}

pytest_bench() {  # pytest_bench NAME FILE ONLY
    local name=$1 file=$2 only=${3:-}
    FASTRES_BENCH_ONLY="$only" run "$name" $PY -m pytest "$file" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$RESULTS/$name.json" --benchmark-columns=median,iqr,rounds,iterations
}

stage() {
    case "$1" in
        build) build ;;
        tests) run tests $PY -m pytest tests -m "gpu and not slow" -q -p no:cacheprovider --junitxml "$RESULTS/tests.xml" ;;
        parity) FASTRES_PARITY_DIR="$RESULTS" run parity $PY -m pytest tests/test_parity.py -m gpu -q -p no:cacheprovider ;;
        bench-models)
            pytest_bench bench-models-resnet50 benchmarks/test_models.py resnet50
            pytest_bench bench-models-resnet18 benchmarks/test_models.py resnet18 ;;
        bench-blocks) pytest_bench bench-blocks benchmarks/test_blocks.py ;;
        bench-ops)
            pytest_bench bench-ops-train_fwd benchmarks/test_ops.py "train_fwd "
            pytest_bench bench-ops-train_fwdbwd benchmarks/test_ops.py "train_fwdbwd "
            pytest_bench bench-ops-infer benchmarks/test_ops.py "infer ,bn_act " ;;
        summary) $PY benchmarks/summarize.py "$RESULTS" > /dev/null && say "wrote $RESULTS/summary.md"; publish ;;
        all) for s in build tests parity bench-models bench-blocks bench-ops summary; do stage "$s"; done ;;
        quick)
            stage build
            FASTRES_BENCH_QUICK=1 FASTRES_BENCH_COMPILE=some pytest_bench bench-quick benchmarks/ ""
            run bench-cli $PY -m fastres.bench --quick --json "$RESULTS/bench-cli-quick.json"
            stage summary ;;
        *) echo "unknown stage '$1' (build tests parity bench-models bench-blocks bench-ops summary all quick)" >&2; exit 2 ;;
    esac
}

[ $# -eq 0 ] && { sed -n '2,26p' "$0"; exit 2; }
say "results in $RESULTS"
for s in "$@"; do stage "$s"; done
exit $STATUS
