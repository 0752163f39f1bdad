"""The host path of a fused op with every Triton launch stubbed: Python calls and launches of one
FusedConvBNReLU2d training forward + backward and of one eval forward (no_grad), against eager's
nn.Conv2d + nn.BatchNorm2d + nn.ReLU on the same tensor. Runs on any CPU (Triton's interpreter front end, no kernel
executes), so it measures what the Python around the kernels costs, which bounds a GPU step from below.

    python -m fastres.bench.host [--json]      (a fresh process: TRITON_INTERPRET must be set before triton loads)
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time


def measure(backend_name: str = "triton", shape=(2, 32, 8, 8), reps: int = 50) -> dict:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton.runtime.jit as jit

    import fastres

    launches = []

    def stub(self, grid):
        return lambda *a, **k: launches.append(getattr(self, "__name__", "kernel"))

    jit.KernelInterface.__getitem__ = stub   # every launch: a counter, no kernel runs
    torch.set_num_threads(1)
    n, c, h, w = shape
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer = fastres.FusedConvBNReLU2d(c, c, 3, padding=1).to(memory_format=torch.channels_last)
    eager = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c),
                                torch.nn.ReLU()).to(memory_format=torch.channels_last)

    def step(m):
        y = m(x)
        y.backward(torch.ones_like(y))

    def calls(f) -> int:
        prof = cProfile.Profile()
        prof.enable()
        f()
        prof.disable()
        return pstats.Stats(prof).total_calls

    def seconds(f) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    def forward(m):
        return m(x)

    def evaluate(m):
        with torch.no_grad():
            m(x)

    with fastres.use_backend(backend_name):
        for _ in range(3):
            step(layer)
        launches.clear()
        fused_calls = calls(lambda: step(layer))
        train_launches = len(launches)
        launches.clear()
        y = forward(layer)
        forward_launches = len(launches)
        y.backward(torch.ones_like(y))
        backward_launches = len(launches) - forward_launches
        layer.eval()
        evaluate(layer)
        launches.clear()
        fused_eval_calls = calls(lambda: evaluate(layer))
        eval_launches = len(launches)
        layer.train()
        fused_s = seconds(lambda: step(layer))
    for _ in range(3):
        step(eager)
    eager_calls = calls(lambda: step(eager))
    eager.eval()
    evaluate(eager)
    eager_eval_calls = calls(lambda: evaluate(eager))
    eager.train()
    return dict(backend=backend_name, shape=list(shape), python_calls=fused_calls, eager_python_calls=eager_calls,
                calls_ratio=fused_calls / eager_calls, train_launches=train_launches,
                train_forward_launches=forward_launches, train_backward_launches=backward_launches,
                eval_launches=eval_launches, eval_python_calls=fused_eval_calls,
                eager_eval_python_calls=eager_eval_calls, eval_calls_ratio=fused_eval_calls / eager_eval_calls,
                host_median_us=fused_s * 1e6, eager_median_us=seconds(lambda: step(eager)) * 1e6,
                note="host_median_us includes aten's CPU convolution backward (the conv's backward is aten's); "
                     "the stubbed kernels do not run")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastres.bench.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="triton", choices=["triton"],
                   help="the fused backend whose host path is measured")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    r = measure(a.backend)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['backend']}: {r['python_calls']} Python calls per training forward + backward "
              f"({r['calls_ratio']:.1f}x eager's {r['eager_python_calls']}), {r['eval_python_calls']} per eval "
              f"forward ({r['eval_calls_ratio']:.1f}x eager's {r['eager_eval_python_calls']}); launches: train "
              f"{r['train_launches']} (forward {r['train_forward_launches']}, backward "
              f"{r['train_backward_launches']} besides aten's conv backward), eval {r['eval_launches']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
