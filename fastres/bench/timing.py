"""Timing and output of the benchmark rows: both providers of a row timed alternately in one run.

Timing rules (shared by ``python -m fastres.bench`` and benchmarks/conftest.py):

* both callables get `warmup` untimed calls first (torch.compile compiles in the first one);
* a round is `iterations` back-to-back calls of one provider, read with :func:`sync_timer` (which waits for
  the GPU first: GPU time plus launch overhead, as a training loop sees it); `iterations` is chosen once
  per row so that a round of the faster provider lasts about ``setup.round_s`` (1 for whole models, tens
  to hundreds for the tiny host-overhead row), and such a row of repeated calls gets at least
  ``setup.tiny_rounds`` rounds;
* rounds alternate between the two providers (baseline, contender, contender, baseline, ...: each provider
  runs as often first as second), so that a machine getting busier or quieter during a row shifts both;
* a row whose providers run on different thread pools (onnxruntime beside torch's OpenMP threads) makes
  `settle` untimed calls before each timed round: on a 2-core CPU the first call after a switch shares the
  cores with the other pool's threads still spinning (measured: ONNX Runtime ResNet-50 b8 64 px 18 ms
  alone, 23 ms right after a torch call, 18.7 ms on the second);
* a row reports each provider's median seconds per call and their ratio
  ``ratio = baseline median / contender median``: fastres' speed over the baseline's, above 1 when fastres
  is faster; ``ratio_paired`` is the median over rounds of the two adjacent rounds' ratio.
"""
from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastres.bench.config import Setup

Fn = Callable[[], object]


def sync_timer() -> float:
    """time.perf_counter() after the GPU has finished queued work (pytest --benchmark-timer)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed_round(fn: Fn, iterations: int) -> float:
    """Seconds per call over `iterations` back-to-back calls."""
    t0 = sync_timer()
    for _ in range(iterations):
        fn()
    return (sync_timer() - t0) / iterations


def warm_up(fns: Tuple[Fn, ...], setup: Setup) -> int:
    """`setup.warmup` calls of each (at least one), then the iterations per round (see the module docstring)."""
    for _ in range(max(1, setup.warmup)):
        for fn in fns:
            fn()
    fastest = min(timed_round(fn, 1) for fn in fns)
    return max(1, min(1000, math.ceil(setup.round_s / max(fastest, 1e-7))))


def rounds_for(setup: Setup, iterations: int) -> int:
    return setup.rounds if iterations == 1 else max(setup.rounds, setup.tiny_rounds)


def settled_round(fn: Fn, iterations: int, settle: int = 0) -> float:
    """`settle` untimed calls, then :func:`timed_round`."""
    for _ in range(settle):
        fn()
    return timed_round(fn, iterations)


def alternate(contender: Fn, baseline: Fn, rounds: int, iterations: int,
              settle: int = 0) -> Tuple[List[float], List[float]]:
    """Seconds per call of each, `rounds` rounds each, in the order B C C B B C ... (each round after
    `settle` untimed calls)."""
    c_times, b_times = [], []
    for r in range(rounds):
        pair = ((baseline, b_times), (contender, c_times))
        for fn, out in (pair if r % 2 == 0 else pair[::-1]):
            out.append(settled_round(fn, iterations, settle))
    return c_times, b_times


def paired_ratio(contender: List[float], baseline: List[float]) -> float:
    """Median over rounds of baseline/contender, round r of each (they ran next to each other)."""
    return statistics.median(b / c for c, b in zip(contender, baseline))


def summary(contender: List[float], baseline: List[float]) -> Dict[str, float]:
    """The figures of a row: medians and minima per call (seconds) and the ratios."""
    c, b = statistics.median(contender), statistics.median(baseline)
    return dict(median_s=c, min_s=min(contender), baseline_median_s=b, baseline_min_s=min(baseline),
                ratio=b / c, ratio_paired=paired_ratio(contender, baseline))


def peak_memory(fn: Fn, setup: Setup) -> Optional[float]:
    """Peak GPU memory of one call in MiB (None on a CPU, where PyTorch does not track it)."""
    if not setup.gpu:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(setup.device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(setup.device) / 2**20


def _error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def run_rows(setup: Setup, todo: list, progress: bool = True) -> List[dict]:
    """Time every Case of `todo` (fastres/bench/cases.py); one dict per row (skipped and failed rows included)."""
    try:
        from tqdm import tqdm
        todo_it = tqdm(todo, disable=not progress, file=sys.stderr, desc="fastres.bench")
    except ImportError:
        todo_it = todo
    rows = []
    for c in todo_it:
        row = dict(level=c.level, case=c.name, provider=c.provider, baseline=c.baseline)
        why = c.skip_reason(setup)
        if why is not None:
            row["skipped"] = why
            rows.append(row)
            continue
        try:
            contender, baseline = c.make_pair()
            t0 = time.perf_counter()
            iterations = warm_up((contender, baseline), setup)
            row["warmup_s"] = time.perf_counter() - t0
            rounds = rounds_for(setup, iterations)
            ct, bt = alternate(contender, baseline, rounds, iterations, c.settle)
            fig = summary(ct, bt)
            row.update(median_ms=fig["median_s"] * 1e3, min_ms=fig["min_s"] * 1e3,
                       baseline_median_ms=fig["baseline_median_s"] * 1e3, ratio=fig["ratio"],
                       ratio_paired=fig["ratio_paired"], rounds=rounds, iterations=iterations,
                       peak_mem_mib=peak_memory(contender, setup), **c.rates(fig["median_s"]))
        except LookupError as e:  # a provider without this case: reported as a skip
            row["skipped"] = _error(e)
        except Exception as e:  # a provider that cannot run a case is reported, not fatal
            row["error"] = _error(e)
        finally:
            contender = baseline = None
            gc.collect()
        rows.append(row)
    return rows


def _rate(r: dict) -> str:
    unit = next((u for u in ("images/s", "GB/s", "TFLOP/s") if u in r), None)
    return f"{r[unit]:.4g} {unit}" if unit else "-"


def versus_eager(rows: List[dict]) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """{case: {provider: (speed over eager, median ms)}} for the cases where a contender is timed against
    eager and against other baselines (the inference baselines onnxruntime, compile+freezing). A contender's
    speed is its ratio to eager; a baseline B's is chained through the contender both comparisons share,
    ratio(C vs eager) / ratio(C vs B): each factor comes from alternated rounds, so a machine slower in one
    test than in the next (both providers of a test move together) does not enter it. Eager: (1, its ms)."""
    timed = [r for r in rows if "median_ms" in r]
    vs_eager = {(r["case"], r["provider"]): r for r in timed if r["baseline"] == "eager"}
    out: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for r in timed:
        e = vs_eager.get((r["case"], r["provider"]))
        if e is None or r["baseline"] == "eager":
            continue
        got = out.setdefault(r["case"], {"eager": (1.0, e["baseline_median_ms"])})
        for c in (x for x in timed if x["case"] == r["case"] and x["baseline"] == "eager"):
            got.setdefault(c["provider"], (c["ratio"], c["median_ms"]))
        got.setdefault(r["baseline"], (e["ratio"] / r["ratio"], r["baseline_median_ms"]))
    return out


def table(rows: List[dict]) -> str:
    """Plain-text table: one line per row, both medians and the ratio (fastres speed / baseline speed); then,
    for cases timed against several baselines, every provider's speed over eager's."""
    head = (f"{'case':<44} {'contender':<22} {'baseline':<16} {'ms':>10} {'base ms':>10} {'ratio':>7} "
            f"{'rate':>18} {'iters':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        who = f"{r['case']:<44} {r['provider']:<22} {r['baseline']:<16}"
        if "median_ms" not in r:
            lines.append(f"{who} {'error: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        lines.append(f"{who} {r['median_ms']:10.3f} {r['baseline_median_ms']:10.3f} {r['ratio']:6.2f}x "
                     f"{_rate(r):>18} {r['iterations']:5d}")
    lines.append("ratio = baseline median / contender median: fastres' speed over the baseline's, > 1 when faster")
    vs = versus_eager(rows)
    if vs:
        lines += ["", "speed over eager (baselines chained through the contender: ratio vs eager / ratio vs "
                  "baseline), median ms in its own test:"]
        for case, got in vs.items():
            cells = "  ".join(f"{p} {x:.2f}x ({ms:.4g} ms)" for p, (x, ms) in got.items() if p != "eager")
            lines.append(f"{case:<44} eager {got['eager'][1]:.4g} ms  {cells}")
    return "\n".join(lines)
