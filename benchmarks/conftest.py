"""pytest-benchmark setup for `pytest benchmarks/ --benchmark-only`.

The cases live in fastres/bench.py (shared with `python -m fastres.bench`); the environment chooses
the setup (fastres.bench.setup_from_env): FASTRES_BENCH_DEVICE, FASTRES_BENCH_QUICK=1,
FASTRES_BENCH_COMPILE=all|some|none, FASTRES_BENCH_PROVIDERS. Unlike tests/, nothing here turns on the
Triton interpreter: its timings are meaningless, so on a CPU fastres runs its torch backend.

Timing: benchmark.pedantic after warm-up rounds, with fastres.bench.sync_timer as pytest-benchmark's
timer (it waits for the GPU before reading the clock); on a GPU each round runs enough iterations to
last about a millisecond, and op cases also record triton.testing.do_bench's median (CUDA events).
Every result carries the device, torch/triton versions and date (extra_info and the JSON's
machine_info), its provider, rates (GB/s, TFLOP/s, images/s) and peak GPU memory.
"""
import pytest
import torch

from fastres import bench

SETUP = bench.setup_from_env()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    from pytest_benchmark.utils import parse_timer

    if getattr(config.option, "benchmark_timer", None) is not None and "perf_counter" in str(config.option.benchmark_timer):
        config.option.benchmark_timer = parse_timer("fastres.bench.sync_timer")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastres"] = dict(bench.environment(SETUP.device), providers=SETUP.providers,
                                   autocast=str(SETUP.autocast), channels_last=SETUP.channels_last)


@pytest.fixture(scope="session")
def setup():
    return SETUP


@pytest.fixture
def run_case(benchmark, setup):
    """run_case(case): time the case for its provider and record what the result needs."""
    def run(case):
        why = case.skip_reason(setup)
        if why is not None:
            pytest.skip(why)
        try:
            fn = case.make()
        except LookupError as e:
            pytest.skip(str(e))
        for _ in range(setup.warmup):
            fn()
        iterations = 1
        if setup.gpu:
            t0 = bench.sync_timer()
            fn()
            iterations = max(1, min(100, int(1e-3 / max(bench.sync_timer() - t0, 1e-6))))
        benchmark.group = f"{case.level}: {case.name}"
        benchmark.pedantic(fn, rounds=setup.reps, warmup_rounds=1, iterations=iterations)
        info = benchmark.extra_info
        info.update(bench.environment(setup.device), provider=case.provider, case=case.name, level=case.level,
                    autocast=str(setup.autocast), channels_last=setup.channels_last)
        if benchmark.stats is not None:  # None under --benchmark-disable
            med = benchmark.stats.stats.median
            info.update(median_s=med, **case.rates(med))
        info["peak_mem_mib"] = bench.peak_memory(fn, setup)
        if setup.gpu and case.level == "ops":
            try:
                import triton.testing

                info["do_bench_ms"] = triton.testing.do_bench(fn, return_mode="median")
            except ImportError:
                pass
    return run
