"""pytest-benchmark setup for `pytest benchmarks/ --benchmark-only`.

The rows live in fastres (fastres/bench/cases.py, shared with `python -m fastres.bench`); the environment
chooses the setup (fastres.bench.config.setup_from_env): FASTRES_BENCH_DEVICE, FASTRES_BENCH_QUICK=1 (also
on when CI=true), FASTRES_BENCH_COMPILE=all|some|none, FASTRES_BENCH_PROVIDERS, FASTRES_BENCH_ONLY,
FASTRES_BENCH_ROUNDS, FASTRES_BENCH_OP_SHAPES=1. Unlike tests/, nothing here turns on the Triton interpreter:
its timings are meaningless, so on a CPU fastres runs its torch backend.

Every test is one row: a contender (fastres) and its baseline (plain PyTorch), same weights and inputs,
timed alternately in the same test (fastres/bench/timing.py): pytest-benchmark times the contender's
rounds (benchmark.pedantic), and its setup / teardown hooks time a baseline round just before the even
rounds and just after the odd ones (B C C B B C ...), and make a row's untimed settle calls (Case.settle).
A round is `iterations` calls (chosen so that the faster provider's round lasts about setup.round_s), so
pytest-benchmark's own stats are per round: the per-call figures are in extra_info (median_s,
baseline_median_s, ratio = baseline / contender median, above 1 when fastres is faster, ratio_paired),
with the environment (device, CPU model, cores, versions, git commit, CPU capability, date), the provider,
the rates (GB/s, TFLOP/s, images/s) and peak GPU memory.
At the end, the terminal summary prints the timed rows as `python -m fastres.bench` does (both medians, the
ratio, and each provider's speed over eager where a case has several baselines).
"""
import pytest
import torch

from fastres.bench import timing as bench_timing
from fastres.bench.config import setup_from_env
from fastres.bench.environment import environment

SETUP = setup_from_env()
ROWS = []   # the timed rows, for the terminal summary


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    from pytest_benchmark.utils import parse_timer

    timer = getattr(config.option, "benchmark_timer", None)
    if timer is not None and "perf_counter" in str(timer):
        config.option.benchmark_timer = parse_timer("fastres.bench.timing.sync_timer")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if ROWS:
        terminalreporter.write_sep("-", "fastres.bench: per-call medians and ratios")
        terminalreporter.write_line(bench_timing.table(ROWS))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastres"] = dict(environment(SETUP.device), quick=SETUP.quick, compile=SETUP.compile,
                                   pairs=[list(p) for p in SETUP.pairs], autocast=str(SETUP.autocast),
                                   rounds=SETUP.rounds, warmup=SETUP.warmup)


@pytest.fixture(scope="session")
def setup():
    return SETUP


@pytest.fixture(scope="session")
def env(setup):
    return environment(setup.device)


@pytest.fixture
def run_case(benchmark, setup, env):
    """run_case(case): time the row's contender against its baseline, alternately; record what a result needs."""
    def run(case):
        why = case.skip_reason(setup)
        if why is not None:
            pytest.skip(why)
        try:
            contender, baseline = case.make_pair()
        except LookupError as e:
            pytest.skip(str(e))
        iterations = bench_timing.warm_up((contender, baseline), setup)
        base_times, rounds_done = [], [0]

        def before():
            if rounds_done[0] % 2 == 0:
                base_times.append(bench_timing.settled_round(baseline, iterations, case.settle))
            for _ in range(case.settle):   # the contender's untimed calls before its round
                contender()

        def after():
            if rounds_done[0] % 2 == 1:
                base_times.append(bench_timing.settled_round(baseline, iterations, case.settle))
            rounds_done[0] += 1

        def target():
            for _ in range(iterations):
                contender()

        benchmark.group = f"{case.level}: {case.name}"
        benchmark.pedantic(target, setup=before, teardown=after, rounds=bench_timing.rounds_for(setup, iterations),
                           iterations=1)
        info = benchmark.extra_info
        info.update(env, provider=case.provider, baseline=case.baseline, case=case.name, level=case.level,
                    autocast=str(setup.autocast), iterations=iterations, quick=setup.quick)
        if benchmark.stats is not None and base_times:  # None under --benchmark-disable
            times = [t / iterations for t in benchmark.stats.stats.data]
            fig = bench_timing.summary(times, base_times)
            info.update(fig, baseline_times_s=base_times, **case.rates(fig["median_s"]))
            ROWS.append(dict(level=case.level, case=case.name, provider=case.provider, baseline=case.baseline,
                             median_ms=fig["median_s"] * 1e3, baseline_median_ms=fig["baseline_median_s"] * 1e3,
                             ratio=fig["ratio"], iterations=iterations, **case.rates(fig["median_s"])))
        info["peak_mem_mib"] = bench_timing.peak_memory(contender, setup)
        if setup.gpu and case.level == "ops":
            try:
                import triton.testing

                info["do_bench_ms"] = triton.testing.do_bench(contender, return_mode="median")
                info["baseline_do_bench_ms"] = triton.testing.do_bench(baseline, return_mode="median")
            except ImportError:
                pass
    return run
