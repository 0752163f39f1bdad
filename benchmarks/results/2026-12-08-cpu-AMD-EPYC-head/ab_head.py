"""The pooled head's effect alone (fastres.backends.torch.pooled_linear_vouched): frozen calls with the plan live,
alternated with and without it (ABBA), 120 pairs, median paired ratio with a 95% bootstrap interval:
python ab_head.py ARCH BATCH SIZE (ARCH as ResNet50, or resnet20 for the CIFAR net)."""
import sys, time, statistics, random, torch, fastres, warnings
warnings.filterwarnings("ignore")
from fastres.models import plan
from fastres.backends import torch as ab
torch.set_num_threads(2)
pc = time.perf_counter_ns
arch, b, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fr = (getattr(fastres, arch)() if arch[0].islower() else getattr(fastres, "Fused" + arch)()).eval(); x = torch.randn(b,3,s,s)
real = ab.pooled_linear_vouched
def interval(r, draws=2000):
    rng = random.Random(0); m = sorted(statistics.median(rng.choices(r, k=len(r))) for _ in range(draws)); return m[50], m[1950]
with torch.no_grad(), fastres.frozen(fr):
    while not plan.live(fr): fr(x)
    for _ in range(5): fr(x)
    on, off = [], []
    for i in range(120):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            ab.pooled_linear_vouched = real if k == 0 else (lambda t, fc: None)
            t = pc(); fr(x); d = pc() - t
            (on if k == 0 else off).append(d)
    ab.pooled_linear_vouched = real
r = [o / n for n, o in zip(on, off)]
print(arch, b, s, "on %.2f ms off %.2f ms, off/on median %.4f [%.4f, %.4f], saved %.0f us" % (statistics.median(on)/1e6, statistics.median(off)/1e6, statistics.median(r), *interval(r), statistics.median([o-n for n, o in zip(on, off)])/1e3))
