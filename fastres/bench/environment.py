"""Where a result was measured: one description of the machine and the software, shared by
``python -m fastres.bench``, the benchmarks/ suite, ``python -m fastres.parity`` and ``python -m fastres.info``.

    python -m fastres.bench.environment                    # the description, as JSON
    python -m fastres.bench.environment --results-dir      # benchmarks/results/<date>-<device> for this machine

:func:`environment` returns the device (the GPU's name, or the CPU model from /proc/cpuinfo or lscpu), the
core count, the versions of Python, torch, triton, torchvision and fastres, fastres' git commit when it
runs from a checkout, the CPU kernels PyTorch picked (``torch.backends.cpu.get_cpu_capability()``, which
ATEN_CPU_CAPABILITY can lower) and the date. Nothing in it raises: what cannot be read is None.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Optional

import torch


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo's "model name", else lscpu's, else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken (a triton that fails to import is a fact worth recording)
        return None


def git_commit() -> Optional[str]:
    """fastres' commit when it is imported from a git checkout (an editable install), "+dirty" when tracked
    files differ from it; None for an installed wheel or without git."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
    if not os.path.exists(os.path.join(here, ".git")):
        return None
    try:
        run = dict(cwd=here, capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_capability() -> Optional[str]:
    """The CPU kernels aten dispatches to here: "default", "avx2", "avx512", ... (ATEN_CPU_CAPABILITY lowers it)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return None


def environment(device=None) -> dict:
    """Where a result is measured: device name and type, cores, versions, git commit, CPU capability, date."""
    dev = torch.device(device if device is not None else "cpu")
    import fastres

    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    else:
        name = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return dict(
        device=name, device_type=dev.type, cpu=cpu_model(), cores=os.cpu_count(), cores_usable=usable,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, triton=_version("triton"),
        torchvision=_version("torchvision"), cuda=torch.version.cuda, fastres=getattr(fastres, "__version__", None),
        git_commit=git_commit(), cpu_capability=cpu_capability(),
        aten_cpu_capability_env=os.environ.get("ATEN_CPU_CAPABILITY"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def slug(text: str) -> str:
    """`text` as a folder-name part: letters, digits and single dashes ("AMD EPYC 7B13" -> "AMD-EPYC-7B13")."""
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9]", "-", text)).strip("-") or "unknown"


def results_dir(env: dict, root: str = os.path.join("benchmarks", "results")) -> str:
    """benchmarks/results/<date>-<device>: <date>-cpu-<model> on a CPU, <date>-<gpu name> on a GPU."""
    device = env["device"] if env["device_type"] == "cuda" else f"cpu-{env['device']}"
    return os.path.join(root, f"{env['date'][:10]}-{slug(device)}")


def summary_line(env: dict) -> str:
    """One line for a report's header."""
    commit = env.get("git_commit") or "no git commit"
    cpu = f", cpu capability {env['cpu_capability']}" if env["device_type"] == "cpu" else ""
    return (f"{env['device']} ({env['device_type']}, {env['cores_usable']} cores usable, {env['torch_threads']} torch "
            f"threads{cpu}); python {env['python']}, torch {env['torch']}, triton {env['triton']}, torchvision "
            f"{env['torchvision']}, fastres {env['fastres']} ({commit}); {env['date']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastres.bench.environment", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--results-dir", action="store_true", help="print only benchmarks/results/<date>-<device>")
    a = p.parse_args(argv)
    env = environment(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(results_dir(env) if a.results_dir else json.dumps(env, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
