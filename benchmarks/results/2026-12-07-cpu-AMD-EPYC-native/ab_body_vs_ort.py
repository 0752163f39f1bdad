"""In-process A/B of a frozen ResNet call, its compiled plan alone (the body: plan.fn on the channels_last input)
and ONNX Runtime on the same input, interleaved rounds, 2 threads:
python benchmarks/results/2026-12-07-cpu-AMD-EPYC-native/ab_body_vs_ort.py ResNet50 8 64 [ROUNDS]"""
import sys, time, statistics, torch, torchvision, fastres, warnings
warnings.filterwarnings("ignore")
from fastres.models import plan
from fastres.bench.baselines import export_onnx, ort_session
torch.set_num_threads(2)
arch, b, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fr = getattr(fastres, "Fused"+arch)().eval()
tv = getattr(torchvision.models, arch.lower())().eval()
x = torch.randn(b,3,s,s)
sess = ort_session(export_onnx(tv, x)); nm = sess.get_inputs()[0].name; xn = x.numpy()
def per(fn, n=10):
    fn(); t=time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter()-t)/n*1e3
with torch.no_grad(), fastres.frozen(fr):
    while not plan.live(fr): fr(x)
    for _ in range(10): fr(x)
    g = plan._PLANS[fr].guards[tuple(x.shape)]
    xc = x.contiguous(memory_format=torch.channels_last)
    fn = g.plan.fn
    R = {"model":[], "plan.fn":[], "ort":[]}
    for r in range(int(sys.argv[4]) if len(sys.argv)>4 else 10):
        R["model"].append(per(lambda: fr(x)))
        R["plan.fn"].append(per(lambda: fn(xc)))
        R["ort"].append(per(lambda: sess.run(None, {nm: xn})))
med = {k: statistics.median(v) for k,v in R.items()}
pr = statistics.median(o/m for o,m in zip(R["ort"],R["model"]))
print(arch,b,s, " ".join("%s %.2f"%kv for kv in med.items()), "ort/model %.3f paired %.3f  ort/plan.fn %.3f" % (med["ort"]/med["model"], pr, med["ort"]/med["plan.fn"]))
