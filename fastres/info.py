"""python -m fastres.info: versions, the extension, devices, and which backend each op will use."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch

import fastres
from fastres import _native, backend
from fastres.bench.environment import environment

# What each backend's kernels cover; the rest of a call's cases run on torch (logged and counted).
COVERAGE = {
    "torch": "every conv2d + BatchNorm2d case, any device (the reference)",
    "triton": "groups=1 convs (1x1/3x3/7x7, any stride/padding/dilation), fp32/fp16/bf16; "
              "grouped convs run on torch",
    "cuda": "cuDNN conv + CUDA C++ BatchNorm kernels (NHWC), fp32/fp16/bf16 on CUDA tensors",
}


def collect() -> Dict[str, object]:
    env = environment("cpu")
    devices: List[str] = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            sm = "".join(map(str, torch.cuda.get_device_capability(i)))
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{sm})")
    ext_ok, ext_why = backend.available("cuda")
    backends = {}
    for name in ("torch", "triton", "cuda"):
        ok, why = backend.available(name)            # installed / built
        here, why_here = backend.runs_here(name)     # and a device it serves is present
        backends[name] = {"installed": ok, "available": here, "why_not": why if not ok else why_here,
                          "covers": COVERAGE[name]}
    per_device = {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        try:
            per_device[dev] = backend.resolve("conv_bn_act", torch.device(dev))
        except backend.BackendUnavailableError as e:
            per_device[dev] = f"error: {e}"
    return {
        "fastres": fastres.__version__,
        "git commit": env["git_commit"] or "none (not a git checkout)",
        "python": env["python"],
        "torch": env["torch"],
        "triton": env["triton"] or "not importable",
        "torchvision": env["torchvision"] or "not installed",
        "cuda (torch build)": torch.version.cuda or "none (CPU build)",
        "extension fastres._C": "built" if ext_ok else f"not built: {ext_why}",
        "extension fastres._cpu": "built" if _native.cpu is not None else f"not loaded: {_native.why}",
        "cpu": f"{env['cpu']} ({env['cores_usable']} cores usable, {env['torch_threads']} torch threads)",
        "cpu capability": f"{env['cpu_capability']}" + (f" (ATEN_CPU_CAPABILITY={env['aten_cpu_capability_env']})"
                                                         if env["aten_cpu_capability_env"] else ""),
        "devices": devices,
        "triton interpreter": backend.interpreter_active(),
        "requested backend": backend.get_backend(),
        "backends": backends,
        "conv_bn_act runs on": per_device,
    }


def render(info: Dict[str, object]) -> str:
    lines = []
    for key in ("fastres", "git commit", "python", "torch", "triton", "torchvision", "cuda (torch build)",
                "extension fastres._C", "extension fastres._cpu", "cpu", "cpu capability", "triton interpreter",
                "requested backend"):
        lines.append(f"{key:24} {info[key]}")
    lines.append(f"{'devices':24} " + "; ".join(info["devices"]))
    lines.append("")
    lines.append(f"{'backend':8} {'installed':10} {'runs here':10} covers / why not")
    for name, b in info["backends"].items():
        lines.append(f"{name:8} {'yes' if b['installed'] else 'no':10} {'yes' if b['available'] else 'no':10} "
                     f"{b['covers'] if b['available'] else b['why_not']}")
    lines.append("")
    lines.append(f"{'op':14} " + " ".join(f"{d:10}" for d in info["conv_bn_act runs on"]))
    lines.append(f"{'conv_bn_act':14} " + " ".join(f"{v:10}" for v in info["conv_bn_act runs on"].values()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastres.info", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
