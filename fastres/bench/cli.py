"""Benchmarks: fastres against plain PyTorch, torch.compile and ONNX Runtime, every row a ratio measured in one run.

    python -m fastres.bench --device cpu            # ResNet-18/50 at 64 px, ResNet-20 at 32 px, host overhead
    python -m fastres.bench --quick                 # the short run (also FASTRES_BENCH_QUICK=1, or CI=true)
    python -m fastres.bench --levels models,blocks,ops --json out.json

The pieces, one job each (benchmarks/, the pytest-benchmark suite, uses the same ones):

* fastres/bench/config.py      - the Setup: device, sizes, formats, (contender, baseline) pairs, rounds;
* fastres/bench/models.py      - model and block cases (training step, inference), weights shared;
* fastres/bench/baselines.py   - the CPU inference baselines onnxruntime and compile+freezing;
* fastres/bench/ops.py         - op cases (per-op host overhead; ResNet-50 conv shapes) and their cost model;
* fastres/bench/cases.py       - the rows of each level;
* fastres/bench/timing.py      - alternating timing, medians and ratios, the table;
* fastres/bench/environment.py - where it ran (device, cores, versions, git commit, CPU capability, date).

Figures on a CPU are CPU figures, labelled with the CPU model; nothing here is a GPU figure unless it ran on one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from fastres.bench.cases import LEVELS, cases
from fastres.bench.config import Setup, make_setup, quick_requested
from fastres.bench.environment import environment, summary_line
from fastres.bench.timing import run_rows, table
from fastres.kernels.cli import OneLineParser as _Parser

__all__ = ["run_cli", "main"]


def run_cli(setup: Setup, levels: List[str], archs: Optional[List[str]] = None, progress: bool = True) -> List[dict]:
    todo = [c for level in levels for c in cases(setup, level, archs)]
    return run_rows(setup, todo, progress)



def _device(p: argparse.ArgumentParser, name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        p.error(f"--device: {name!r} is not a device (cpu, cuda, cuda:N)")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {name}: expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {name}: no CUDA GPU is available here")
    return name


def main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog="python -m fastres.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", default=None,
                   help="few rounds, no torch.compile (default: on when FASTRES_BENCH_QUICK=1 or CI=true)")
    p.add_argument("--levels", default="models,ops", help=f"any of {', '.join(LEVELS)} (default: models,ops)")
    p.add_argument("--arch", default=None, help="models level: comma-separated archs (default: all of the setup)")
    p.add_argument("--providers", default=None, help="comma-separated contenders and baselines to keep")
    p.add_argument("--compile", choices=["all", "some", "none"], default=os.environ.get("FASTRES_BENCH_COMPILE"),
                   help="which rows get the torch.compile pair (default: all on a GPU, some on a CPU, none if quick)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per provider and row")
    p.add_argument("--batch-size", type=int, default=None, help="models level: training batch size")
    p.add_argument("--only", default=None, help="comma-separated substrings of row names to keep")
    p.add_argument("--op-shapes", action="store_true", help="ops level: also every ResNet-50 conv shape")
    p.add_argument("--json", metavar="OUT", default="fastres-bench.json")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    quick = quick_requested() if a.quick is None else a.quick
    if a.rounds is not None and a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    if a.batch_size is not None and a.batch_size < 2:
        p.error(f"--batch-size must be at least 2 (BatchNorm in training), got {a.batch_size}")
    setup = make_setup(_device(p, a.device), quick, a.compile)
    if a.rounds:
        setup.rounds = a.rounds
    if a.batch_size:
        for m in setup.models:
            m.train_batch = a.batch_size if m.train_batch else 0   # inference-only rows stay so
    if a.only:
        setup.only = tuple(a.only.split(","))
    setup.op_shapes = setup.op_shapes or a.op_shapes
    if a.providers:
        wanted = a.providers.split(",")
        unknown = set(wanted) - set(setup.providers)
        if unknown:
            p.error(f"providers {sorted(unknown)} are not available here; available: {setup.providers}")
        setup.pairs = [pr for pr in setup.pairs if pr[0] in wanted and pr[1] in wanted]
    levels = a.levels.split(",")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        p.error(f"unknown levels {bad}: expected {', '.join(LEVELS)}")
    archs = [x for x in a.arch.split(",") if x] if a.arch else None
    if archs is not None:
        known = list(dict.fromkeys(m.arch for m in setup.models))
        unknown = [x for x in archs if x not in known]
        if unknown or not archs:
            p.error(f"--arch {a.arch!r}: the models level here benchmarks {', '.join(known)}")
    env = environment(setup.device)
    precision = f"autocast {setup.autocast}" if setup.autocast else "fp32"
    print(f"fastres.bench{' (quick)' if quick else ''}, {precision}: {summary_line(env)}")
    rows = run_cli(setup, levels, archs, progress=not a.no_progress)
    if not rows:
        print("fastres.bench: error: no row matches these options (--levels, --arch, --only, --providers); "
              "nothing measured, nothing written", file=sys.stderr)
        return 2
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(environment=env, setup={k: str(v) for k, v in vars(setup).items()}, results=rows), f,
                      indent=1)
        print(f"wrote {a.json}")
    return 1 if any("error" in r for r in rows) else 0
