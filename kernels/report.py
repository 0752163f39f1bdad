"""Compiled-kernel report: every Triton kernel of fastres.kernels, compiled for an NVIDIA GPU with no GPU.

    python -m fastres.kernels.report --out DIR [--arch 90] [--dtype bf16[,fp16,fp32]] [--subset | --cases A,B]

For every ResNet-50 conv shape at batch 256 (RESNET50_CASES) and every dtype asked for,
report_variants.py lists the launches each kernel module's host code makes there (one per kernel,
epilogue and config the launcher could pick). Each is compiled by Triton's real compiler (TTIR ->
PTX -> ptxas) for sm_<arch> (90: sm_90a), its PTX written to DIR, and measured:

* n_regs, n_spills: registers per thread and spill-store bytes, from `ptxas -v` on that PTX;
* shared_bytes: the kernel's shared memory (Triton's metadata);
* kstep_instructions: PTX instructions of the innermost loop holding wgmma / mma.sync (the K-step of a
  tensor-core loop; null without one); innermost_loop_instructions: the same for the innermost loop
  of any kind; kstep_ld_global_b16: scalar 16-bit global loads inside the K-step (element gathers);
* grid: programs the launcher's own grid function gives; bytes, flops: the launch's minimum memory
  traffic and work; predicted_us = max(flops / 989e12, bytes / 3.35e12) * 1e6, an H100 SXM roofline
  (dense bf16 tensor-core peak, HBM3 bandwidth): a prediction, not a measurement.

Writes DIR/report.json = {"target", "triton", "variants": [...], "notes": [...]} and prints a table.
Exit status: 0 when every variant compiled, 1 when one failed (report.json says which), 3 when this
Triton has no usable NVIDIA backend / ptxas. Under TRITON_INTERPRET=1 @triton.jit yields interpreted
functions that cannot be compiled: the tool re-executes itself with TRITON_INTERPRET=0.

The variant format (kernel, fn, role, epilogue, config, signature, constexprs, aligned, grid, bytes,
flops) is report_variants.py's.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import time

from fastres.kernels.cli import OneLineParser as _Parser

PEAK_FLOPS = 989e12   # H100 SXM dense bf16 tensor-core FLOP/s
PEAK_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s

# The distinct conv shapes of torchvision's ResNet-50 (v1.5: stride in the 3x3) at batch 256.
RESNET50_CASES = [
    dict(name="stem", n=256, cin=3, h=224, w=224, cout=64, kh=7, kw=7, stride=2, pad=3),
    dict(name="l1.1x1.64-64", n=256, cin=64, h=56, w=56, cout=64, kh=1, kw=1, stride=1, pad=0),
    dict(name="l1.3x3.64", n=256, cin=64, h=56, w=56, cout=64, kh=3, kw=3, stride=1, pad=1),
    dict(name="l1.1x1.64-256", n=256, cin=64, h=56, w=56, cout=256, kh=1, kw=1, stride=1, pad=0),
    dict(name="l1.1x1.256-64", n=256, cin=256, h=56, w=56, cout=64, kh=1, kw=1, stride=1, pad=0),
    dict(name="l2.1x1.256-128", n=256, cin=256, h=56, w=56, cout=128, kh=1, kw=1, stride=1, pad=0),
    dict(name="l2.3x3.128/2", n=256, cin=128, h=56, w=56, cout=128, kh=3, kw=3, stride=2, pad=1),
    dict(name="l2.down.256-512/2", n=256, cin=256, h=56, w=56, cout=512, kh=1, kw=1, stride=2, pad=0),
    dict(name="l2.1x1.128-512", n=256, cin=128, h=28, w=28, cout=512, kh=1, kw=1, stride=1, pad=0),
    dict(name="l2.1x1.512-128", n=256, cin=512, h=28, w=28, cout=128, kh=1, kw=1, stride=1, pad=0),
    dict(name="l2.3x3.128", n=256, cin=128, h=28, w=28, cout=128, kh=3, kw=3, stride=1, pad=1),
    dict(name="l3.1x1.512-256", n=256, cin=512, h=28, w=28, cout=256, kh=1, kw=1, stride=1, pad=0),
    dict(name="l3.3x3.256/2", n=256, cin=256, h=28, w=28, cout=256, kh=3, kw=3, stride=2, pad=1),
    dict(name="l3.down.512-1024/2", n=256, cin=512, h=28, w=28, cout=1024, kh=1, kw=1, stride=2, pad=0),
    dict(name="l3.1x1.256-1024", n=256, cin=256, h=14, w=14, cout=1024, kh=1, kw=1, stride=1, pad=0),
    dict(name="l3.1x1.1024-256", n=256, cin=1024, h=14, w=14, cout=256, kh=1, kw=1, stride=1, pad=0),
    dict(name="l3.3x3.256", n=256, cin=256, h=14, w=14, cout=256, kh=3, kw=3, stride=1, pad=1),
    dict(name="l4.1x1.1024-512", n=256, cin=1024, h=14, w=14, cout=512, kh=1, kw=1, stride=1, pad=0),
    dict(name="l4.3x3.512/2", n=256, cin=512, h=14, w=14, cout=512, kh=3, kw=3, stride=2, pad=1),
    dict(name="l4.down.1024-2048/2", n=256, cin=1024, h=14, w=14, cout=2048, kh=1, kw=1, stride=2, pad=0),
    dict(name="l4.1x1.512-2048", n=256, cin=512, h=7, w=7, cout=2048, kh=1, kw=1, stride=1, pad=0),
    dict(name="l4.1x1.2048-512", n=256, cin=2048, h=7, w=7, cout=512, kh=1, kw=1, stride=1, pad=0),
    dict(name="l4.3x3.512", n=256, cin=512, h=7, w=7, cout=512, kh=3, kw=3, stride=1, pad=1),
]
# --subset (CI): the stem (Cin 3, 7x7), the largest output (C 64 at 56x56), a strided 3x3, the smallest
# output with the widest channels (C 2048 at 7x7).
SUBSET = ("stem", "l1.3x3.64", "l2.3x3.128/2", "l4.1x1.512-2048")
DTYPES = ("bf16", "fp16", "fp32")
ROLES = ("conv", "bn_reduce", "bn_merge", "bn_elementwise")
KERNEL_MODULES = ("conv", "batchnorm")   # fastres.kernels.<name>, described by report_variants.VARIANTS[name]


def predicted_us(flops, nbytes):
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES) * 1e6


# ---- PTX reading ---------------------------------------------------------------------------------

_LABEL = re.compile(r"^\s*(\$L\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L\w+)\s*;")
_B16_LOAD = re.compile(r"\bld\.global(?:\.(?!v\d)\w+)*\.(?:b16|u16|s16|f16|bf16)\b")


def _is_instruction(line):
    s = line.strip()
    return s.endswith(";") and not s.startswith((".", "//", "{", "}"))


def ptx_loops(ptx):
    """(first line, last line) of every loop of the PTX: a label and a branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    loops = []
    for j, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = j
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:
            loops.append((labels[b.group(1)], j))
    return lines, loops


def ptx_metrics(ptx):
    """kstep_instructions / innermost_loop_instructions / kstep_ld_global_b16 / wgmma / mma_sync of a PTX."""
    lines, loops = ptx_loops(ptx)

    def innermost(pred):
        spans = [(i, j) for i, j in loops if pred(lines[i:j + 1])]
        return min(spans, key=lambda s: s[1] - s[0]) if spans else None

    def count(span):
        return None if span is None else sum(_is_instruction(ln) for ln in lines[span[0]:span[1] + 1])

    kstep = innermost(lambda body: any("wgmma.mma_async" in ln or "mma.sync" in ln for ln in body))
    return dict(
        kstep_instructions=count(kstep),
        innermost_loop_instructions=count(innermost(lambda body: True)),
        kstep_ld_global_b16=None if kstep is None else sum(
            bool(_B16_LOAD.search(ln)) for ln in lines[kstep[0]:kstep[1] + 1]),
        wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx)


def _ptxas():
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(90).path   # Triton 3.6 and 3.8: knobs tool with .path
    except (AttributeError, TypeError):
        return nv.get_ptxas().path


def ptxas_usage(ptx_path, arch):
    """(registers, spill-store bytes) from `ptxas -v`, for the arch's sm_XX(a) target."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    proc = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", ptx_path, "-o", os.devnull],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx_path}: {proc.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return int(regs.group(1)) if regs else 0, int(spills.group(1)) if spills else 0


# ---- compiling ------------------------------------------------------------------------------------

def _ast_source(fn, signature, constexprs, aligned):
    """ASTSource in the form Triton 3.2 - 3.8 take (checked: 3.6.0 and 3.8.0 share it): signature by
    name with "constexpr" entries, constexprs and attrs keyed by argument-index tuples."""
    import triton
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource).parameters
    if not {"signature", "constexprs", "attrs"} <= set(params):
        raise SystemExit(f"fastres.kernels.report: Triton {triton.__version__} has ASTSource{tuple(params)}; "
                         "this tool speaks ASTSource(fn, signature, constexprs, attrs) (Triton 3.2+)")
    index = {a: i for i, a in enumerate(fn.arg_names)}
    return ASTSource(fn, dict(signature), {(index[a],): v for a, v in constexprs.items()},
                     {(index[a],): [["tt.divisibility", 16]] for a in aligned})


def compile_variant(v, arch, out_dir, memo):
    """Compile variant v once per distinct (kernel, signature, constants, alignment, options); fills v with
    the measurements and v["ptx"] (path relative to out_dir)."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = {k: v["config"][k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in v["config"]}
    key = json.dumps([v["kernel"], v["signature"], sorted((k, repr(x)) for k, x in v["constexprs"].items()),
                      sorted(v["aligned"]), sorted(options.items()), arch])
    if key not in memo:
        t0 = time.perf_counter()
        try:
            k = triton.compile(_ast_source(v["fn"], v["signature"], v["constexprs"], v["aligned"]),
                               target=GPUTarget("cuda", arch, 32), options=options)
            ptx = k.asm["ptx"]
            name = f"{v['kernel'].lstrip('_')}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.ptx"
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(ptx)
            regs, spills = ptxas_usage(os.path.join(out_dir, name), arch)
            memo[key] = dict(ptx=name, n_regs=regs, n_spills=spills, shared_bytes=int(k.metadata.shared),
                             **ptx_metrics(ptx))
        except Exception as e:  # noqa: BLE001 - recorded in the report, the exit status says so
            memo[key] = dict(error=f"{type(e).__name__}: {e}"[-4000:])
        memo[key]["compile_s"] = round(time.perf_counter() - t0, 2)
    v.update(memo[key])


def kernel_modules():
    import importlib

    return {name: importlib.import_module(f"fastres.kernels.{name}") for name in KERNEL_MODULES}


def jit_kernels(module):
    """Names of the @triton.jit kernels a module holds (helpers called by another jit function excluded)."""
    from triton.runtime.jit import JITFunction

    jitted = {k: f for k, f in vars(module).items() if isinstance(f, JITFunction)}
    helpers = {k for k in jitted if any(k + "(" in f.src for o, f in jitted.items() if o != k)}
    return sorted(set(jitted) - helpers)


def collect(cases, dtypes):
    """(variants, notes, kernels): every module's variants at every case and dtype."""
    from fastres.kernels.report_variants import VARIANTS  # imports triton: not at this module's import

    variants, notes, kernels = [], [], {}
    for name, mod in kernel_modules().items():
        kernels[name] = jit_kernels(mod)
        fn = VARIANTS.get(name)
        if fn is None:
            notes.append(f"{name}: no report_variants (fastres.kernels.report_variants.VARIANTS) for "
                         f"fastres.kernels.{name} yet; its kernels {kernels[name]} are not in this report")
            continue
        for case in cases:
            for dt in dtypes:
                for v in fn(case, dt):
                    variants.append(dict(v, case=case["name"], dtype=dt, module=name))
        missing = sorted(set(kernels[name]) - {v["kernel"] for v in variants if v["module"] == name})
        if missing:
            notes.append(f"{name}: kernels {missing} have no variant")
    return variants, notes, kernels


def _check_compilable():
    """Exit 3 with the reason when this Triton cannot compile for NVIDIA here."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas_version

        if "nvidia" not in backends:
            raise RuntimeError(f"no NVIDIA backend in this Triton (backends: {sorted(backends)})")
        get_ptxas_version(90)
    except Exception as e:  # noqa: BLE001
        print(f"fastres.kernels.report: cannot compile for NVIDIA here: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(3)


def build_report(out_dir, arch=90, dtypes=("bf16",), subset=False, log=sys.stderr, case_names=None):
    """Compile every variant, write out_dir/report.json and the PTX files; return the report.
    Cases: case_names if given, else SUBSET if subset, else all of RESNET50_CASES."""
    import triton
    from triton.runtime.jit import JITFunction

    _check_compilable()
    os.makedirs(out_dir, exist_ok=True)
    names = case_names or (SUBSET if subset else [c["name"] for c in RESNET50_CASES])
    unknown = sorted(set(names) - {c["name"] for c in RESNET50_CASES})
    if unknown:
        raise SystemExit(f"fastres.kernels.report: unknown cases {unknown}")
    cases = [c for c in RESNET50_CASES if c["name"] in names]
    variants, notes, kernels = collect(cases, dtypes)
    memo = {}
    t0 = time.perf_counter()
    for i, v in enumerate(variants):
        if not isinstance(v["fn"], JITFunction):
            raise SystemExit(f"fastres.kernels.report: {v['kernel']} is {type(v['fn']).__name__}, not a compilable "
                             "JITFunction (TRITON_INTERPRET=1 at import?)")
        compile_variant(v, arch, out_dir, memo)
        v["predicted_us"] = round(predicted_us(v["flops"], v["bytes"]), 3)
        print(f"[{i + 1}/{len(variants)}] {v['kernel']} {v['case']} {v['dtype']} {v['epilogue']}: "
              f"{'FAILED' if 'error' in v else 'ok'}", file=log, flush=True)
    report = dict(target=f"sm_{arch}a" if arch >= 90 else f"sm_{arch}", triton=triton.__version__,
                  cases=[c["name"] for c in cases], kernels=kernels, notes=notes, distinct_compiles=len(memo),
                  seconds=round(time.perf_counter() - t0, 1),
                  variants=[{k: x for k, x in v.items() if k != "fn"} for v in variants])
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def format_table(report):
    cols = ("kernel", "role", "case", "dtype", "epilogue", "grid", "n_regs", "n_spills", "shared_bytes",
            "kstep_instructions", "innermost_loop_instructions", "predicted_us")
    head = ("kernel", "role", "case", "dtype", "epilogue", "grid", "regs", "spills", "smem", "kstep", "loop", "pred_us")
    rows = [head] + [tuple("FAILED" if c not in v and "error" in v else str(v.get(c, "-")) for c in cols)
                     for v in report["variants"]]
    widths = [min(40, max(len(r[i]) for r in rows)) for i in range(len(cols))]
    lines = ["  ".join(str(x)[:w].ljust(w) for x, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [f"note: {n}" for n in report["notes"]])



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit under the interpreter gives InterpretedFunction: start again without it
        env = dict(os.environ, TRITON_INTERPRET="0")
        os.execve(sys.executable, [sys.executable, "-m", "fastres.kernels.report", *argv], env)
    p = _Parser(prog="python -m fastres.kernels.report", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for report.json and the PTX files")
    p.add_argument("--arch", type=int, default=90, help="compute capability: 80 (sm_80) or 90 (sm_90a)")
    p.add_argument("--dtype", default="bf16", help=f"data dtype(s), comma-separated, of {DTYPES}")
    p.add_argument("--subset", action="store_true", help=f"only the cases {SUBSET} (CI)")
    p.add_argument("--cases", default="", help="comma-separated case names (overrides --subset)")
    args = p.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        p.error(f"--dtype: expected some of {DTYPES}, got {args.dtype!r}")
    if args.arch < 80:
        p.error(f"--arch: compute capability 80 (sm_80) or above, e.g. 90 (sm_90a), got {args.arch}")
    cases = [c for c in args.cases.split(",") if c] or None
    unknown = sorted(set(cases or ()) - {c["name"] for c in RESNET50_CASES})
    if unknown:
        p.error(f"--cases: unknown {unknown}; known: {', '.join(c['name'] for c in RESNET50_CASES)}")
    report = build_report(args.out, args.arch, dtypes, args.subset, case_names=cases)
    print(format_table(report))
    failed = [v for v in report["variants"] if "error" in v]
    print(f"{len(report['variants'])} variants, {report['distinct_compiles']} distinct compiles, "
          f"{len(failed)} failed, {report['seconds']} s ({report['target']}, Triton {report['triton']})")
    for v in failed:
        print(f"FAILED {v['kernel']} {v['case']} {v['dtype']} {v['epilogue']}: {v['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
