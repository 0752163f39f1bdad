"""In-process A/B of a frozen plan's guard (fastres.models.plan_guard) against the full check on every call
(the guard switched off by making fastres.models.plan.armed answer None), NCHW input, 2 threads:
python benchmarks/results/2026-12-07-cpu-AMD-EPYC-guard/ab_guard.py"""
import statistics
import time
import warnings

import torch

import fastres
from fastres.models import plan, resnet

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
ROWS = [("FusedResNet50", 8, 64), ("FusedResNet50", 1, 224), ("FusedResNet18", 16, 64), ("FusedResNet18", 1, 224)]


def seconds_per_call(fn, n):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def row(arch, batch, size):
    armed = plan.armed
    model = getattr(fastres, arch)().eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad(), fastres.frozen(model):
        while not plan.live(model):
            model(x)
        for _ in range(5):
            model(x)
        n = max(3, int(0.3 / seconds_per_call(lambda: model(x), 2)))
        guard, full = [], []
        try:
            for r in range(12):
                for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                    resnet.plan.armed = armed if k == 0 else (lambda m, x: None)
                    (guard if k == 0 else full).append(seconds_per_call(lambda: model(x), n))
        finally:
            resnet.plan.armed = armed
    g, f = statistics.median(guard), statistics.median(full)
    paired = statistics.median(b / a for a, b in zip(guard, full))
    print(f"{arch} b{batch} {size}px: guard {g * 1e3:.2f} ms, full check {f * 1e3:.2f} ms, "
          f"full / guard {f / g:.3f} (paired {paired:.3f})", flush=True)


if __name__ == "__main__":
    for arch, batch, size in ROWS:
        row(arch, batch, size)
