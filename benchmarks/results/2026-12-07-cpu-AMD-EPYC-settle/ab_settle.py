"""fastres.frozen (its compiled plan live) against ONNX Runtime, in one process, on the same weights and
input, 2 threads, many interleaved rounds per row (ABBA order), with a bootstrap interval for the median
paired ratio, so that "level" and "ahead" can be told apart from this VM's noise:
python benchmarks/results/2026-12-07-cpu-AMD-EPYC-settle/ab_settle.py [ROUNDS] [ROW ...]
(a ROW as resnet50:8:64; default: the README table's eight rows)."""
import random
import statistics
import sys
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
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def interval(ratios, draws=2000):
    """95% bootstrap interval of the median of `ratios`."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws)]


def row(arch, batch, size, fmt, rounds):
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
        n = max(2, int(0.3 / seconds_per_call(lambda: fm(xf), 2)))
        ours, theirs = [], []
        for r in range(rounds):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                if k == 0:
                    ours.append(seconds_per_call(lambda: fm(xf), n))
                else:
                    theirs.append(seconds_per_call(lambda: sess.run(None, feed), n))
    ratios = [t / o for o, t in zip(ours, theirs)]
    lo, hi = interval(ratios)
    print(f"{arch} b{batch} {size}px {fmt}: frozen {statistics.median(ours) * 1e3:.2f} ms, ONNX Runtime "
          f"{statistics.median(theirs) * 1e3:.2f} ms; ONNX Runtime / frozen per round: median "
          f"{statistics.median(ratios):.3f} [95% {lo:.3f}, {hi:.3f}], {sum(q > 1 for q in ratios)}/{rounds} "
          f"rounds frozen faster", flush=True)


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    rows = [(a, int(b), int(s)) for a, b, s in (r.split(":") for r in sys.argv[2:])] or ROWS
    for arch, batch, size in rows:
        for fmt in ("nchw", "channels_last"):
            row(arch, batch, size, fmt, rounds)
