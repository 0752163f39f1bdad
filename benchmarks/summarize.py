"""Write summary.md for a results folder: ResNet-50 / ResNet-18 images/s per provider with ratios, the
op and block medians, and the parity and test outcomes found there.

    python benchmarks/summarize.py benchmarks/results/<date>-<gpu>

Reads every pytest-benchmark JSON (*.json with a "benchmarks" list) and parity-*.json in the folder.
"""
import glob
import json
import os
import sys
from collections import defaultdict


def load_benchmarks(folder):
    rows, machine = [], None
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            data = json.load(open(path))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue
        machine = machine or data.get("machine_info", {}).get("fastres")
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "case" in info:
                rows.append(dict(info, median_s=b["stats"]["median"]))
    return rows, machine


def rate_table(rows, level, unit, title):
    by_case = defaultdict(dict)
    providers = []
    for r in rows:
        if r["level"] != level or unit not in r:
            continue
        by_case[r["case"]][r["provider"]] = r
        if r["provider"] not in providers:
            providers.append(r["provider"])
    if not by_case:
        return []
    fused = [p for p in providers if p.startswith("fastres-")]
    head = ["case"] + [f"{p} {unit}" for p in providers] + [f"{p} / {b}" for p in fused for b in ("eager", "compile")
                                                              if b in providers]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, got in by_case.items():
        cells = [case] + [f"{got[p][unit]:.4g}" if p in got else "-" for p in providers]
        for p in fused:
            for b in ("eager", "compile"):
                if b in providers:
                    ok = p in got and b in got
                    cells.append(f"{got[p][unit] / got[b][unit]:.2f}x" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if level == "models":
        mem = [f"{c} {p}: {r['peak_mem_mib']:.0f} MiB" for c, got in by_case.items() for p, r in got.items()
               if "train" in c and r.get("peak_mem_mib")]
        if mem:
            lines += ["", "Peak memory, training step: " + "; ".join(mem)]
    return lines + [""]


def parity_lines(folder):
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "parity-*.json"))):
        r = json.load(open(path))
        c = r["config"]
        worst = max(r["checks"], key=lambda k: k["fused_err"] / max(k["limit"], 1e-300))
        lines.append(f"| {c['arch']} | {c['dtype']} | {c['backend']} | {c['steps']} | {c['batch_size']}x{c['image_size']} "
                     f"| {'pass' if r['passed'] else 'FAIL'} | {worst['name']}: {worst['fused_err']:.2e} "
                     f"(limit {worst['limit']:.2e}) | {r.get('saturated', 0)} |")
    if not lines:
        return []
    return ["### Training parity", "", "| arch | dtype | backend | steps | batch | result | closest check | saturated |",
            "|---|---|---|---|---|---|---|---|"] + lines + [""]


def main(folder):
    rows, machine = load_benchmarks(folder)
    out = [f"# fastres results: {os.path.basename(os.path.abspath(folder))}", ""]
    if machine:
        out += [f"Device: {machine.get('device')}; torch {machine.get('torch')}, triton {machine.get('triton')}, "
                f"CUDA {machine.get('cuda')}; autocast {machine.get('autocast')}, channels_last "
                f"{machine.get('channels_last')}; {machine.get('date')}.", ""]
    out += rate_table(rows, "models", "images/s", "Models (images/s, higher is better)")
    out += rate_table(rows, "blocks", "images/s", "Blocks (images/s)")
    out += rate_table(rows, "ops", "TFLOP/s", "Ops: conv cases (TFLOP/s)")
    out += rate_table(rows, "ops", "GB/s", "Ops: minimum bytes over time (GB/s)")
    out += parity_lines(folder)
    for log in sorted(glob.glob(os.path.join(folder, "*.log"))):
        tail = open(log, errors="replace").read().strip().splitlines()[-1:] or [""]
        out.append(f"- `{os.path.basename(log)}`: {tail[0][:200]}")
    text = "\n".join(out) + "\n"
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
