"""In-process A/B of a frozen plan's guard proved in C++ (fastres._cpu, csrc/cpu/plan_guard.cpp) against
the same guard proved in Python (its C++ form set aside), NCHW input, 2 threads, interleaved rounds; the
proof's own time per call in the loop beside each:
python benchmarks/results/2026-12-07-cpu-AMD-EPYC-native/ab_native.py"""
import statistics
import time
import warnings

import torch

import fastres
from fastres.models import plan, plan_guard

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
ROWS = [("FusedResNet50", 8, 64), ("FusedResNet50", 1, 224), ("FusedResNet18", 16, 64), ("FusedResNet18", 1, 224)]


def row(arch, batch, size):
    model = getattr(fastres, arch)().eval()
    x = torch.randn(batch, 3, size, size)
    holds = plan_guard.Guard.holds
    proof = {"c++": [], "python": []}
    calls = {"c++": [], "python": []}
    with torch.no_grad(), fastres.frozen(model):
        while not plan.live(model):
            model(x)
        for _ in range(10):
            model(x)
        g = plan._PLANS[model].guards[tuple(x.shape)]
        native = g.native
        assert native is not None, "fastres._cpu is not loaded: " + __import__("fastres._native").__dict__.get("why", "")
        try:
            for r in range(12):
                for k in (("c++", "python") if r % 2 == 0 else ("python", "c++")):
                    g.native = native if k == "c++" else None

                    def timed(self, k=k):
                        t = time.perf_counter()
                        ok = holds(self)
                        proof[k].append(time.perf_counter() - t)
                        return ok
                    plan_guard.Guard.holds = timed
                    t = time.perf_counter()
                    for _ in range(8):
                        model(x)
                    calls[k].append((time.perf_counter() - t) / 8)
        finally:
            plan_guard.Guard.holds = holds
            g.native = native
        assert g.hits >= 190, g.hits   # every call ran the plan through the guard
    ms = {k: statistics.median(v) * 1e3 for k, v in calls.items()}
    pr = {k: statistics.median(v) * 1e3 for k, v in proof.items()}
    paired = statistics.median(p / c for c, p in zip(calls["c++"], calls["python"]))
    print(f"{arch} b{batch} {size}px: proof c++ {pr['c++']:.3f} ms, python {pr['python']:.3f} ms; call c++ "
          f"{ms['c++']:.2f} ms, python {ms['python']:.2f} ms; python / c++ {ms['python'] / ms['c++']:.3f} "
          f"(paired {paired:.3f})", flush=True)


if __name__ == "__main__":
    for arch, batch, size in ROWS:
        row(arch, batch, size)
