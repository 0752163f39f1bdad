"""fastres's default path (no fastres.frozen) against torchvision eager, the same weights and input, in one
process, 2 threads: single calls alternated (ABAB, the order flipped every pair), the median of the paired
ratios with a 95% bootstrap interval:
python benchmarks/results/2026-12-07-cpu-AMD-EPYC-default-path/ab_default.py [PAIRS] [ROW ...]
(a ROW as resnet18:1:224:channels_last:eval; default: the eight eval rows of the README's table and two
training rows). Above 1: fastres faster."""
import random
import statistics
import sys
import time
import warnings

import torch
import torchvision

import fastres

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
FUSED = {"resnet18": fastres.FusedResNet18, "resnet50": fastres.FusedResNet50}
ROWS = [(a, b, s, f, "eval") for a, b, s in (("resnet18", 16, 64), ("resnet50", 8, 64), ("resnet50", 1, 224),
                                              ("resnet18", 1, 224)) for f in ("nchw", "channels_last")]
ROWS += [("resnet18", 16, 64, f, "train") for f in ("nchw", "channels_last")]


def step(model, x, y, mode):
    if mode == "eval":
        model.eval()

        def f():
            with torch.no_grad():
                model(x)
        return f
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)

    def f():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return f


def row(arch, batch, size, fmt, mode, pairs):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    fm = FUSED[arch]()
    fm.load_state_dict(tv.state_dict())
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    tv, fm = tv.to(memory_format=mf), fm.to(memory_format=mf)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=mf)
    y = torch.randint(0, 1000, (batch,))
    fa, fb = step(tv, x, y, mode), step(fm, x, y, mode)
    for _ in range(3):
        fa(), fb()
    a, b = [], []
    for r in range(pairs):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            (fa if k == 0 else fb)()
            (a if k == 0 else b).append(time.perf_counter() - t)
    ratios = [p / q for p, q in zip(a, b)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(1000))
    print(f"{arch} b{batch} {size}px {fmt} {mode}: torchvision {statistics.median(a) * 1e3:.2f} ms, fastres "
          f"{statistics.median(b) * 1e3:.2f} ms; torchvision / fastres per pair: median {statistics.median(ratios):.3f} "
          f"[95% {meds[25]:.3f}, {meds[975]:.3f}]", flush=True)


if __name__ == "__main__":
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rows = [(a, int(b), int(s), f, m) for a, b, s, f, m in (r.split(":") for r in sys.argv[2:])] or ROWS
    for r in rows:
        row(*r, pairs)
