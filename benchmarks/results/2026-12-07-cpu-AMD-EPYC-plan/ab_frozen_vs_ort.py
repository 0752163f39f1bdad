"""In-process A/B of fastres.frozen (its compiled plan live) against ONNX Runtime on the same weights and
input, 2 threads: python benchmarks/results/2026-12-07-cpu-AMD-EPYC-plan/ab_frozen_vs_ort.py"""
import statistics
import time
import warnings

import torch
import torchvision

import fastres
from fastres.bench.baselines import export_onnx, ort_session
from fastres.models import plan

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
ROWS = [("resnet18", 16, 64), ("resnet50", 8, 64), ("resnet50", 1, 224), ("resnet18", 1, 224)]
FUSED = {"resnet18": fastres.FusedResNet18, "resnet50": fastres.FusedResNet50}


def seconds_per_call(fn, n):
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def row(arch, batch, size, fmt):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)().eval()
    fm = FUSED[arch]().eval()
    fm.load_state_dict(tv.state_dict())
    x = torch.randn(batch, 3, size, size)
    xf = x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x
    sess = ort_session(export_onnx(tv, x))
    feed = {sess.get_inputs()[0].name: x.numpy()}
    with torch.no_grad(), fastres.frozen(fm):
        while not plan.live(fm):
            fm(xf)
        diff = (fm(xf) - torch.from_numpy(sess.run(None, feed)[0])).abs().max().item()
        n = max(2, int(0.4 / seconds_per_call(lambda: fm(xf), 2)))
        ours, theirs = [], []
        for r in range(10):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                if k == 0:
                    ours.append(seconds_per_call(lambda: fm(xf), n))
                else:
                    theirs.append(seconds_per_call(lambda: sess.run(None, feed), n))
    a, b = statistics.median(ours), statistics.median(theirs)
    paired = statistics.median(t / o for o, t in zip(ours, theirs))
    print(f"{arch} b{batch} {size}px {fmt}: frozen {a * 1e3:.2f} ms, ONNX Runtime {b * 1e3:.2f} ms, "
          f"frozen / ONNX Runtime {b / a:.3f} (paired {paired:.3f}); max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    for arch, batch, size in ROWS:
        for fmt in ("nchw", "channels_last"):
            row(arch, batch, size, fmt)
