"""The compiled-kernel report (python -m fastres.kernels.report) and the targets it measures.

The slow tests run the tool once (--subset --arch 90 --dtype bf16) in a subprocess, with
TRITON_INTERPRET=1 inherited as the test session sets it, so the tool's re-execution without the
interpreter is exercised too, then check report.json: its form, no spills anywhere, BatchNorm
reductions on >= 132 programs (one per SM of an H100 / H200), and the conv targets: wgmma in the
K-step, at most 128 PTX instructions there, no scalar 16-bit global load (an element-wise gather) in it.
The fast tests check the PTX reader on hand-written PTX and the ResNet-50 cases; the variants
themselves (without compiling) are test_report_variants.py's.
"""
import json
import os
import subprocess
import sys

import pytest

from fastres.kernels import report as rep

SMS = 132
KSTEP_MAX = 128
VARIANT_KEYS = {"kernel", "role", "case", "dtype", "config", "grid", "ptx", "n_regs", "n_spills", "shared_bytes",
                "kstep_instructions", "bytes", "flops", "predicted_us"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    env = dict(os.environ, TRITON_INTERPRET="1")   # the tool must restart itself without the interpreter
    proc = subprocess.run([sys.executable, "-m", "fastres.kernels.report", "--out", str(out), "--arch", "90",
                           "--dtype", "bf16", "--subset"], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode == 3:
        pytest.skip(f"the report tool cannot compile for NVIDIA here: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0 and (out / "report.json").exists(), (
        f"report tool failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out, json.loads((out / "report.json").read_text()), proc.stdout



def _where(v):
    return f"{v['kernel']} {v['case']} {v['dtype']} {v['epilogue']} {v['config']}"


@pytest.mark.slow
def test_report_is_well_formed(report):
    import triton

    out, r, table = report
    assert r["target"] == "sm_90a" and r["triton"] == triton.__version__
    assert r["cases"] == list(rep.SUBSET) or sorted(r["cases"]) == sorted(rep.SUBSET)
    assert r["variants"], "no variants"
    for v in r["variants"]:
        assert VARIANT_KEYS <= set(v), f"{_where(v)}: missing {VARIANT_KEYS - set(v)}"
        assert "error" not in v, f"{_where(v)}: {v.get('error')}"
        assert v["role"] in rep.ROLES and v["dtype"] == "bf16" and v["case"] in rep.SUBSET
        assert isinstance(v["grid"], int) and v["grid"] > 0
        assert v["bytes"] > 0 and v["flops"] > 0 and v["n_regs"] > 0
        assert {"num_warps", "num_stages"} <= set(v["config"])
        assert v["predicted_us"] == pytest.approx(rep.predicted_us(v["flops"], v["bytes"]), rel=1e-3, abs=1e-3)
        ptx = (out / v["ptx"]).read_text()
        assert f".entry {v['kernel']}" in ptx and r["target"] in ptx, f"{_where(v)}: {v['ptx']} is not its PTX"
        assert all(t == "constexpr" for a, t in v["signature"].items() if a in v["constexprs"])
    for v in r["variants"][:5]:
        assert v["kernel"] in table and v["case"] in table, "the printed table lacks variants"


@pytest.mark.slow
def test_every_kernel_has_a_variant(report):
    _, r, _ = report
    assert r["kernels"]["batchnorm"], "no @triton.jit kernels found in fastres.kernels.batchnorm"
    for module, kernels in r["kernels"].items():
        covered = {v["kernel"] for v in r["variants"] if v["module"] == module}
        if not covered:
            assert any(n.startswith(f"{module}: ") and "no report_variants" in n for n in r["notes"]), (
                f"{module}: no variants and no note saying why")
            assert module == "conv", f"{module} must describe its launches (kernels/report_variants.py)"
            continue
        assert set(kernels) <= covered, f"{module}: kernels without a variant: {set(kernels) - covered}"


@pytest.mark.slow
def test_no_spills(report):
    spilled = [f"{_where(v)}: {v['n_spills']} bytes" for v in report[1]["variants"] if v["n_spills"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


@pytest.mark.slow
def test_bn_reductions_fill_the_gpu(report):
    rows = [v for v in report[1]["variants"] if v["role"] in ("bn_reduce", "bn_merge")]
    assert {v["role"] for v in rows} == {"bn_reduce", "bn_merge"}
    small = [f"{_where(v)}: {v['grid']} programs" for v in rows if v["grid"] < SMS]
    assert not small, f"reductions on fewer than {SMS} programs:\n" + "\n".join(small)


@pytest.mark.slow
def test_conv_kstep_targets(report):
    """The conv's targets (no xfail: a variant that misses one fails)."""
    conv = [v for v in report[1]["variants"] if v["role"] == "conv"]
    if not conv:
        assert any(n.startswith("conv: ") for n in report[1]["notes"])
        return
    bad = []
    for v in conv:
        if not v["wgmma"]:
            bad.append(f"{_where(v)}: no wgmma")
        if v["kstep_instructions"] is None or v["kstep_instructions"] > KSTEP_MAX:
            bad.append(f"{_where(v)}: K-step of {v['kstep_instructions']} instructions (target <= {KSTEP_MAX})")
        if v["kstep_ld_global_b16"]:
            bad.append(f"{_where(v)}: {v['kstep_ld_global_b16']} scalar ld.global.b16 in the K-step")
    assert not bad, "\n".join(bad)


# ---- fast: the PTX reader and the cases -------------------------------------------------

PTX = """
.visible .entry k(
    .param .u64 k_param_0
)
{
    .reg .b32 %r<9>;
    mov.u32 %r1, 0;
$L__BB0_1:
    add.s32 %r1, %r1, 1;
$L__BB0_2:
    ld.global.b16 %rs1, [%rd1];
    ld.global.v4.b16 {%rs1, %rs2, %rs3, %rs4}, [%rd1];
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd2, %rd3, 1, 1, 1, 0, 0;
    // a comment;
    @%p1 bra $L__BB0_2;
    setp.lt.s32 %p2, %r1, 4;
    @%p2 bra $L__BB0_1;
$L__BB0_3:
    add.s32 %r2, %r2, 1;
    @%p3 bra.uni $L__BB0_3;
    ret;
}
"""


def test_ptx_metrics_find_the_innermost_tensor_core_loop():
    m = rep.ptx_metrics(PTX)
    assert m["kstep_instructions"] == 4          # the two loads, the wgmma, the branch back
    assert m["kstep_ld_global_b16"] == 1         # the scalar load, not the vector one
    assert m["innermost_loop_instructions"] == 2  # the last loop: add + bra.uni
    assert m["wgmma"] and not m["mma_sync"]
    plain = rep.ptx_metrics(PTX.replace("wgmma.mma_async", "add.f32"))
    assert plain["kstep_instructions"] is None and plain["kstep_ld_global_b16"] is None


def test_resnet50_cases_are_distinct_and_complete():
    shapes = [tuple(c[k] for k in ("cin", "h", "w", "cout", "kh", "kw", "stride", "pad")) for c in rep.RESNET50_CASES]
    assert len(set(shapes)) == len(shapes) == 23 and len({c["name"] for c in rep.RESNET50_CASES}) == 23
    from fastres.kernels.report_variants import case_out_hw

    assert {case_out_hw(c) for c in rep.RESNET50_CASES} == {(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)}
    assert set(rep.SUBSET) <= {c["name"] for c in rep.RESNET50_CASES}
