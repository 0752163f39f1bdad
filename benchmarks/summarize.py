"""Write summary.md for a results folder: one table per level (models, blocks, ops), one line per row with
each comparison's two medians and its ratio, and the parity and test outcomes found there.

    python benchmarks/summarize.py benchmarks/results/<date>-<device>

Reads every pytest-benchmark JSON (*.json with a "benchmarks" list), every ``python -m fastres.bench`` JSON
(*.json with a "results" list) and parity-*.json in the folder. A comparison is (contender, baseline), timed
alternately in one run; ratio = baseline median / contender median (fastres' speed over the baseline's,
above 1 when fastres is faster).
"""
import glob
import json
import os
import sys
from collections import defaultdict

LEVELS = (("models", "Models"), ("blocks", "Blocks"), ("ops", "Ops"))


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_rows(folder):
    """(rows, environment): one row per timed comparison, median_s / baseline_median_s per call."""
    rows, env = [], None
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        data = _load(path)
        if not isinstance(data, dict):
            continue
        if "benchmarks" in data:  # pytest-benchmark
            env = env or data.get("machine_info", {}).get("fastres")
            for b in data["benchmarks"]:
                info = b.get("extra_info", {})
                if "case" in info and "median_s" in info:
                    rows.append(dict(info, source=os.path.basename(path)))
        elif "results" in data:  # python -m fastres.bench --json
            env = env or data.get("environment")
            for r in data["results"]:
                if "median_ms" in r:
                    rows.append(dict(r, median_s=r["median_ms"] / 1e3, baseline_median_s=r["baseline_median_ms"] / 1e3,
                                     source=os.path.basename(path)))
    return rows, env


def _ms(seconds):
    return f"{seconds * 1e3:.4g}"


def level_table(rows, level, title):
    by_case = defaultdict(dict)
    pairs = []
    for r in rows:
        if r.get("level") != level:
            continue
        pair = (r["provider"], r.get("baseline", "eager"))
        by_case[r["case"]][pair] = r
        if pair not in pairs:
            pairs.append(pair)
    if not by_case:
        return []
    head = ["case"]
    for c, b in pairs:
        head += [f"{b} ms", f"{c} ms", f"{c} / {b}"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, got in by_case.items():
        cells = [case]
        for pair in pairs:
            r = got.get(pair)
            cells += ([_ms(r["baseline_median_s"]), _ms(r["median_s"]), f"**{r['ratio']:.2f}x**"] if r
                      else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Times: median ms per call (models and blocks: one training step or one inference call).")
    mem = [f"{c} {p[0]}: {r['peak_mem_mib']:.0f} MiB" for c, got in by_case.items() for p, r in got.items()
           if r.get("peak_mem_mib")]
    if mem:
        lines += ["", "Peak GPU memory of one call: " + "; ".join(mem)]
    return lines + [""]


def versus_eager_table(rows, level="models"):
    """For cases where a contender is timed against eager and against other baselines (onnxruntime,
    compile+freezing): every provider's speed over eager's. A contender's is its ratio to eager; a baseline
    B's is chained through the contender both comparisons share, ratio(C vs eager) / ratio(C vs B), each
    factor from alternated rounds (as fastres.bench.timing.versus_eager)."""
    rows = [r for r in rows if r.get("level") == level]
    vs_eager = {(r["case"], r["provider"]): r for r in rows if r.get("baseline", "eager") == "eager"}
    cases = {}
    for r in rows:
        e = vs_eager.get((r["case"], r["provider"]))
        if e is None or r.get("baseline", "eager") == "eager":
            continue
        got = cases.setdefault(r["case"], {"eager": (1.0, e["baseline_median_s"])})
        for c in (x for x in rows if x["case"] == r["case"] and x.get("baseline", "eager") == "eager"):
            got.setdefault(c["provider"], (c["ratio"], c["median_s"]))
        got.setdefault(r["baseline"], (e["ratio"] / r["ratio"], r["baseline_median_s"]))
    if not cases:
        return []
    providers = list(dict.fromkeys(p for got in cases.values() for p in got if p != "eager"))
    head = ["case", "eager ms"] + [f"{p} / eager (ms)" for p in providers]
    lines = ["### Speed over eager", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, got in cases.items():
        cells = [case, _ms(got["eager"][1])]
        cells += [f"**{got[p][0]:.2f}x** ({_ms(got[p][1])})" if p in got else "-" for p in providers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Speed over eager: a contender's ratio to eager; a baseline's chained through the "
                        "contender both comparisons share (ratio vs eager / ratio vs the baseline), each factor "
                        "from alternated rounds. In parentheses: median ms in its own test.", ""]


def parity_lines(folder):
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "parity-*.json"))):
        r = _load(path)
        if not r:
            continue
        c = r["config"]
        worst = max(r["checks"], key=lambda k: k["fused_err"] / max(k["limit"], 1e-300))
        lines.append(f"| {c['arch']} | {c['dtype']} | {c['backend']} | {c['steps']} | "
                     f"{c['batch_size']}x{c['image_size']} | {'pass' if r['passed'] else 'FAIL'} | "
                     f"{worst['name']}: {worst['fused_err']:.2e} (limit {worst['limit']:.2e}) | "
                     f"{r.get('saturated', 0)} |")
    if not lines:
        return []
    head = "| arch | dtype | backend | steps | batch | result | closest check | saturated |"
    return ["### Training parity", "", head, "|---|---|---|---|---|---|---|---|"] + lines + [""]


def header(env):
    if not env:
        return []
    g = env.get
    device = f"{g('device')} ({g('device_type')}, {g('cores_usable', g('cores'))} cores usable"
    device += f", {g('torch_threads')} torch threads" if g("torch_threads") else ""
    device += f", CPU capability {g('cpu_capability')}" if g("device_type") == "cpu" else f", CUDA {g('cuda')}"
    mode = "; quick mode (figures not for the record)" if g("quick") else ""
    return [f"Device: {device}). Python {g('python')}, torch {g('torch')}, triton {g('triton')}, torchvision "
            f"{g('torchvision')}, fastres {g('fastres')} (commit {g('git_commit') or 'unknown'}); autocast "
            f"{g('autocast', 'n/a')}{mode}; {g('date')}.", "",
            "Each row times a contender and its baseline alternately in one run, same weights and inputs; "
            "`a / b` = b's median / a's median (above 1: fastres faster).", ""]


def main(folder):
    rows, env = load_rows(folder)
    out = [f"# fastres results: {os.path.basename(os.path.abspath(folder))}", ""] + header(env)
    for level, title in LEVELS:
        out += level_table(rows, level, title)
        if level == "models":
            out += versus_eager_table(rows)
    out += parity_lines(folder)
    for log in sorted(glob.glob(os.path.join(folder, "*.log"))):
        with open(log, errors="replace") as f:
            tail = f.read().strip().splitlines()[-1:] or [""]
        out.append(f"- `{os.path.basename(log)}`: {tail[0][:200]}")
    text = "\n".join(out) + "\n"
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
