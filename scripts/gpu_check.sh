#!/usr/bin/env bash
# fastres on a lent GPU machine: build, GPU tests, training parity, benchmarks, summary.
#
#   scripts/gpu_check.sh [--dry-run] STAGE [STAGE ...]
#
# Stages, with their time limits in seconds (LIMIT_<stage> overrides one, e.g. LIMIT_tests=300):
#   build       120  scripts/build_inplace.py: fastres._C compiled once in place for FASTRES_CUDA_ARCHS
#                    (default 90a), no pip, no `wheel`, no network; a compile error stops it at once
#   tests       240  pytest -m "gpu and not slow" in 4 shards run side by side (Triton compiles on 4 cores):
#                    triton backend, cuda backend, the extension's kernels, the rest; one junit XML per shard
#   bench-r50   150  ResNet-50 at 224 px: training step b256, inference b1 and b256; fastres-triton and
#                    fastres-cuda against eager and torch.compile, and the training step replayed from a
#                    CUDA graph against torchvision's, captured alike (FASTRES_BENCH_PROVIDERS)
#   parity      120  GPU training parity: pytest tests/test_parity.py -m gpu; one JSON per run
#   profile      90  scripts/gpu_profile.py: one ResNet-50 training step per provider under torch.profiler
#                    (wall, host and device time, launches, top kernels)
#   bench-r18    75  ResNet-18, the same rows
#   summary      15  summary.md from everything in the results folder (10), the Triton cache's hits (5)
#   first            build tests bench-r50 parity profile bench-r18 summary: the first run, 810 s of limits
#                    in all, the most informative first: give it a DEADLINE to fit one device call
# DEADLINE=<epoch seconds>: every stage's limit is cut to what is left before it (25 s kept for the
# summary), a stage with no time left is skipped and said so; e.g. DEADLINE=$(( $(date +%s) + 580 )).
# The tests stage runs each shard under pytest-xdist when it is there (WORKERS_<shard>: triton 6, rest 4,
# cuda 2, ext 2).
# Longer runs, after the first:
#   bench-models 540 every model row (ResNet-50 and -18, batch 1 / 32 / 256, every provider)
#   bench-blocks 540 Bottleneck / BasicBlock, training step and inference
#   bench-ops    540 every ResNet-50 conv shape: training forward, forward+backward, inference, BN+add+ReLU
#   all              build tests parity bench-models bench-blocks bench-ops summary
#
# --dry-run: every stage's commands run, the GPU-only steps skipped: the build without compiling
# (build_inplace.py --dry-run), each pytest selection collected (--collect-only; the test shards must be
# non-empty and together the whole GPU selection), the summary made; results go to a temporary folder.
# CI runs it (.ci/run), so a typo fails there and not on the GPU.
#
# A warm Triton cache (scripts/triton_cache.py build: Triton 3.6.0 for this Python 3.12, sm_90a, the ResNet
# launches, built on a CPU) at TRITON_WARM_CACHE (default scripts/triton-cache-sm90a.tar.xz, committed) is
# installed into the run's cache by the build stage (it says when the kernels changed since); the summary
# says how many compiles it saved.
# Results go to benchmarks/results/<date>-<gpu>/ (RESULTS_DIR overrides): pytest-benchmark JSON,
# parity JSON, one log per stage, summary.md; when $OUT is set (the device runner's output folder) the
# results folder is archived there (results.tgz, and summary.md) after every stage. Python: PYTHON
# (default python3); after the build, the interpreter build_inplace.py names (kept in build/gpu-python).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x "$(cat build/gpu-python 2>/dev/null)" ] && PY=$(cat build/gpu-python)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
if [ "$DRY" = 1 ]; then
    RESULTS=${RESULTS_DIR:-$(mktemp -d)/dry-run}
else
    RESULTS=${RESULTS_DIR:-benchmarks/results/$(date -u +%Y-%m-%d)-${GPU:-nogpu}}
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
STATUS=0
SHARDS=(triton cuda ext rest)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
WARM=${TRITON_WARM_CACHE:-scripts/triton-cache-sm90a.tar.xz}
# every cache lookup and compile, one line each (scripts/triton_cache.py's logging cache manager)
export TRITON_CACHE_LOG="$RESULTS/triton-cache.log" PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_MANAGER=triton_cache:LoggingFileCacheManager
export FASTRES_BENCH_PROVIDERS=${FASTRES_BENCH_PROVIDERS:-fastres-triton,fastres-cuda,eager,compile,fastres-triton+graphs,fastres-cuda+graphs,graphs}

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

publish() {  # the device runner returns at most 8 files: the whole results folder as one archive
    if [ "$DRY" = 0 ] && [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        local part="$OUT/.results.$BASHPID.tgz"  # test shards publish side by side
        tar -czf "$part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null && mv "$part" "$OUT/results.tgz"
        rm -f "$part"
        [ -f "$RESULTS/summary.md" ] && cp "$RESULTS/summary.md" "$OUT/"
    fi
}

# limit STAGE DEFAULT: the stage's limit (LIMIT_<stage>, else DEFAULT), cut to what is left before DEADLINE
# (epoch seconds; the summary's 25 s kept back) so that a run of many stages ends inside the device's limit
limit() {
    local v="LIMIT_${1//-/_}" lim left keep=25
    lim=${!v:-$2}
    [ "$1" = summary ] && keep=0
    if [ -n "${DEADLINE:-}" ]; then
        left=$(( DEADLINE - $(date +%s) - keep ))
        [ "$left" -lt "$lim" ] && lim=$left
        [ "$lim" -lt 1 ] && lim=1
    fi
    echo "$lim"
}

# run NAME LIMIT CMD...: CMD under LIMIT seconds, output to the terminal and $RESULTS/NAME.log
run() {
    local name=$1 lim=$2; shift 2
    if [ "$lim" -le 1 ]; then
        say "$name: skipped, no time left before DEADLINE"; echo "skipped: no time left" > "$RESULTS/$name.log"
        STATUS=1; return 0
    fi
    say "$name (limit ${lim}s): $*"
    local t0; t0=$(date +%s)
    timeout --signal=INT --kill-after=20 "$lim" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "exit status $rc after $(( $(date +%s) - t0 ))s" >> "$RESULTS/$name.log"
    [ "$rc" -eq 124 ] && say "$name: stopped at the ${lim}s limit"
    [ "$rc" -ne 0 ] && STATUS=1
    say "$name: exit status $rc after $(( $(date +%s) - t0 ))s"
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
        for tool in ncu compute-sanitizer; do echo "$tool: $(command -v $tool || echo 'not on PATH')"; done
        git rev-parse HEAD 2>/dev/null
    } > "$RESULTS/environment.txt"
}

build() {
    local args=() arch=${FASTRES_CUDA_ARCHS:-90a}
    [ "$DRY" = 1 ] && args=(--dry-run)
    run build "$(limit build 120)" env FASTRES_BUILD_CUDA=1 FASTRES_CUDA_ARCHS="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" scripts/build_inplace.py "${args[@]}"
    local py; py=$(sed -n 's/^python: //p' "$RESULTS/build.log" | tail -1)
    if [ "$DRY" = 0 ] && [ -z "$py" ]; then
        # the extension did not build (build.log says why): the checkout made importable without it, so
        # that the triton and torch backends' GPU tests still run (the cuda ones then fail, named)
        say "build: fastres._C did not build; the checkout without it"
        run build-nocuda "$(limit build-nocuda 60)" env FASTRES_BUILD_CUDA=0 "$PY" scripts/build_inplace.py
        py=$(sed -n 's/^python: //p' "$RESULTS/build-nocuda.log" | tail -1)
    fi
    if [ "$DRY" = 0 ] && [ -n "$py" ]; then PY=$py; mkdir -p build && echo "$PY" > build/gpu-python; fi
    say "build: python is $PY"
    # the warm Triton cache into the run's cache (a dry run: into a scratch folder, the install checked)
    local dest=$TRITON_CACHE_DIR
    [ "$DRY" = 1 ] && dest=$(mktemp -d)
    timeout 60 "$PY" scripts/triton_cache.py install "$WARM" "$dest" 2>&1 | tee "$RESULTS/warm-cache.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { say "build: the warm cache did not install"; STATUS=1; }
    [ "$DRY" = 1 ] && rm -rf "$dest"
    env_info
}

shard() {  # shard NAME: SHARD=(the pytest arguments of that test shard); together they are the GPU selection
    case "$1" in
        triton) SHARD=(tests/backends/test_fused_backends.py -k triton) ;;
        cuda) SHARD=(tests/backends/test_fused_backends.py -k "not triton") ;;
        ext) SHARD=(tests/csrc) ;;
        rest) SHARD=(tests --ignore=tests/backends/test_fused_backends.py --ignore=tests/csrc) ;;
    esac
}

collected() { grep -oE '^[0-9]+(/[0-9]+)? tests? collected' "$RESULTS/$1.log" | grep -oE '^[0-9]+' || echo 0; }

tests_stage() {
    local sel=(-m "gpu and not slow" -q -p no:cacheprovider) s
    if [ "$DRY" = 1 ]; then
        # collected as the GPU would (the triton backend marked gpu too); nothing runs
        export FASTRES_COLLECT_AS_GPU=1
        run tests-all 60 "$PY" -m pytest tests "${sel[@]}" --collect-only
        local total sum=0 n
        total=$(collected tests-all)
        for s in "${SHARDS[@]}"; do
            shard "$s"
            run "tests-$s" 60 "$PY" -m pytest "${SHARD[@]}" "${sel[@]}" --collect-only
            n=$(collected "tests-$s")
            [ "$n" -gt 0 ] || { say "tests-$s: selects no test"; STATUS=1; }
            sum=$(( sum + n ))
        done
        unset FASTRES_COLLECT_AS_GPU
        [ "$sum" = "$total" ] || { say "tests: the shards select $sum tests, the GPU selection $total"; STATUS=1; }
        say "tests: $sum tests in ${#SHARDS[@]} shards (dry run)"
        return 0
    fi
    local lim; lim=$(limit tests 240)
    # side by side: Triton compiles on one core per process; with pytest-xdist (the GPU image has it)
    # each shard spreads over WORKERS_<shard> processes too, 14 in all for the machine's 16 cores
    local xdist=0; "$PY" -c "import xdist" 2>/dev/null && xdist=1
    say "tests: pytest-xdist $([ $xdist = 1 ] && echo present || echo absent: one process per shard)"
    for s in "${SHARDS[@]}"; do
        shard "$s"
        local par=() w="WORKERS_$s" n
        n=${!w:-$(case $s in triton) echo 6 ;; rest) echo 4 ;; *) echo 2 ;; esac)}
        [ "$xdist" = 1 ] && [ "$n" -gt 1 ] && par=(-n "$n")
        run "tests-$s" "$lim" "$PY" -m pytest "${SHARD[@]}" "${sel[@]}" "${par[@]}" --junitxml "$RESULTS/tests-$s.xml" \
            > /dev/null &
    done
    wait
    for s in "${SHARDS[@]}"; do
        say "tests-$s: $(grep -hE '[0-9]+ (passed|failed|skipped|deselected|error)' "$RESULTS/tests-$s.log" | tail -1) ($(tail -1 "$RESULTS/tests-$s.log"))"
        tail -1 "$RESULTS/tests-$s.log" | grep -q "^exit status 0 " || STATUS=1
    done
    publish
}

pytest_bench() {  # pytest_bench NAME LIMIT FILE ONLY
    local name=$1 lim=$2 file=$3 only=${4:-}
    if [ "$DRY" = 1 ]; then
        FASTRES_BENCH_DEVICE=cuda FASTRES_BENCH_ONLY="$only" run "$name" 60 "$PY" -m pytest "$file" --collect-only -q \
            -p no:cacheprovider
        grep -qE '^[0-9]+ tests? collected' "$RESULTS/$name.log" || { say "$name: selects no row"; STATUS=1; }
        return 0
    fi
    FASTRES_BENCH_ONLY="$only" run "$name" "$lim" "$PY" -m pytest "$file" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$RESULTS/$name.json" --benchmark-columns=median,iqr,rounds,iterations
}

parity() {
    local extra=()
    [ "$DRY" = 1 ] && extra=(--collect-only)
    FASTRES_PARITY_DIR="$RESULTS" run parity "$(limit parity 120)" "$PY" -m pytest tests/test_parity.py -m gpu -q \
        -p no:cacheprovider "${extra[@]}"
}

profile() {  # one ResNet-50 training step per provider under torch.profiler (scripts/gpu_profile.py)
    local args=(--out "$RESULTS")
    [ "$DRY" = 1 ] && args+=(--device cpu --batch 2)
    run profile "$(limit profile 90)" "$PY" scripts/gpu_profile.py "${args[@]}"
}

summary() {
    run summary "$(limit summary 10)" "$PY" benchmarks/summarize.py "$RESULTS"
    run triton-cache 5 "$PY" scripts/triton_cache.py stats --log "$TRITON_CACHE_LOG" --warm "$WARM"
}

MODELS="resnet50 train,resnet50 infer b1 ,resnet50 infer b256"
stage() {
    case "$1" in
        build) build ;;
        tests) tests_stage ;;
        parity) parity ;;
        bench-r50) pytest_bench bench-r50 "$(limit bench-r50 150)" benchmarks/test_models.py "$MODELS" ;;
        bench-r18) pytest_bench bench-r18 "$(limit bench-r18 75)" benchmarks/test_models.py "${MODELS//resnet50/resnet18}" ;;
        bench-models)
            FASTRES_BENCH_PROVIDERS= pytest_bench bench-models-resnet50 "$(limit bench-models 540)" benchmarks/test_models.py resnet50
            FASTRES_BENCH_PROVIDERS= pytest_bench bench-models-resnet18 "$(limit bench-models 540)" benchmarks/test_models.py resnet18 ;;
        bench-blocks) pytest_bench bench-blocks "$(limit bench-blocks 540)" benchmarks/test_blocks.py ;;
        bench-ops)
            pytest_bench bench-ops-train_fwd "$(limit bench-ops 540)" benchmarks/test_ops.py "train_fwd "
            pytest_bench bench-ops-train_fwdbwd "$(limit bench-ops 540)" benchmarks/test_ops.py "train_fwdbwd "
            pytest_bench bench-ops-infer "$(limit bench-ops 540)" benchmarks/test_ops.py "infer ,bn_act " ;;
        profile) profile ;;
        summary) summary ;;
        first) for s in build tests bench-r50 parity profile bench-r18 summary; do stage "$s"; done ;;
        all) for s in build tests parity bench-models bench-blocks bench-ops summary; do stage "$s"; done ;;
        *) echo "unknown stage '$1' (build tests bench-r50 parity profile bench-r18 summary first bench-models bench-blocks" \
                "bench-ops all)" >&2; exit 2 ;;
    esac
}

[ $# -eq 0 ] && { sed -n '2,43p' "$0"; exit 2; }
say "results in $RESULTS$([ "$DRY" = 1 ] && echo ' (dry run: GPU-only steps skipped)')"
for s in "$@"; do stage "$s"; done
say "done, exit status $STATUS"
exit $STATUS
