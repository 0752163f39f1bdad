"""One ResNet training step per provider under torch.profiler: where the time goes (host vs device).

    python scripts/gpu_profile.py [--arch resnet50] [--batch 64] [--device cuda] [--out DIR]

Providers: torchvision eager and fastres on each backend available on the device (torch, triton, cuda),
the same weights and inputs (fastres.bench.models.make_model, the benchmark suite's training step:
forward, cross-entropy, backward, SGD step; channels_last + bf16 autocast on a GPU). Each provider is
warmed up (Triton compiles, cuDNN picks its algorithms) and then one step is timed three ways:

* wall: the step with a device synchronisation after it (median of a few steps);
* host: the same step's time to return to Python without the synchronisation, i.e. how long the host needs
  to enqueue it (a step is launch-bound when host >= wall);
* device: the sum of the profiled kernels' device times of one step, with the launch count and the top
  kernels.

Writes profile.json and profile.md into --out (default: the current folder). On a CPU it runs too (tiny
batch, the torch backend only), so that the script itself is tested without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastres.bench.config import fastres_backends, make_setup  # noqa: E402
from fastres.bench.models import make_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _kernel_events(prof, device: torch.device):
    """(name, device microseconds) of each kernel the profiler saw (CPU ops on a CPU)."""
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if t and e.device_type == torch.autograd.DeviceType.CUDA:
                rows.append((e.key, float(t), int(e.count)))
        elif e.self_cpu_time_total:
            rows.append((e.key, float(e.self_cpu_time_total), int(e.count)))
    return sorted(rows, key=lambda r: -r[1])


def profile_provider(arch: str, batch: int, provider: str, setup, image=None, steps: int = 5, top: int = 8) -> dict:
    step = make_model(arch, "train", batch, provider, setup, image=image)
    dev = setup.device
    for _ in range(3):
        step()
    _sync(dev)
    walls, hosts = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        hosts.append(time.perf_counter() - t0)
        _sync(dev)
        walls.append(time.perf_counter() - t0)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        _sync(dev)
    kernels = _kernel_events(prof, dev)
    return {
        "provider": provider,
        "wall_ms": 1e3 * statistics.median(walls),
        "host_ms": 1e3 * statistics.median(hosts),
        "device_ms": sum(k[1] for k in kernels) / 1e3,
        "launches": sum(k[2] for k in kernels),
        "top": [{"kernel": k[0][:90], "ms": k[1] / 1e3, "count": k[2]} for k in kernels[:top]],
    }


def markdown(arch: str, batch: int, env: str, rows) -> str:
    out = [f"# One {arch} training step at batch {batch} under torch.profiler", "", env, "",
           "| provider | wall ms | host ms (no sync) | device ms (kernels) | launches |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['provider']} | failed: {r['error']} | | | |")
        else:
            out.append(f"| {r['provider']} | {r['wall_ms']:.2f} | {r['host_ms']:.2f} | {r['device_ms']:.2f} | "
                       f"{r['launches']} |")
    for r in rows:
        if "top" in r:
            out += ["", f"## {r['provider']}: top kernels by device time", "", "| kernel | ms | calls |",
                    "|---|---:|---:|"]
            out += [f"| `{k['kernel']}` | {k['ms']:.3f} | {k['count']} |" for k in r["top"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", help="a registered ImageNet net (default resnet50)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 64 on a GPU, 2 on a CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--out", default=".", help="folder for profile.json and profile.md")
    a = p.parse_args(argv)
    setup = make_setup(a.device)
    gpu = setup.device.type == "cuda"
    batch = a.batch or (64 if gpu else 2)
    image = None if gpu else 32   # on a CPU a smoke run of the script itself: tiny images
    providers = ["eager"] + [f"fastres-{b}" for b in fastres_backends(setup.device)]
    from fastres.bench.environment import environment, summary_line

    env = summary_line(environment(setup.device))
    rows = []
    for prov in providers:
        try:
            rows.append(profile_provider(a.arch, batch, prov, setup, image))
        except Exception as e:  # one provider's failure is a result, not the end of the run
            rows.append({"provider": prov, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top"}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "profile.json"), "w") as f:
        json.dump({"arch": a.arch, "batch": batch, "environment": env, "rows": rows}, f, indent=1)
    md = markdown(a.arch, batch, env, rows)
    with open(os.path.join(a.out, "profile.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
