"""Every Triton kernel of fastres.kernels compiles for real NVIDIA GPUs: sm_80 (A100) and sm_90a (H100),
in fp16, bf16 and fp32, with no GPU.

The rest of the suite runs the kernels through Triton's interpreter, which never lowers them to PTX
and cannot run bf16. Here each launch the host functions make (kernels/report_variants.py: the
constexpr flags, block sizes, warps and stages, integer specializations of a real launch) goes
through the real compiler (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas) by the report tool,
`python -m fastres.kernels.report`, run once per target in a subprocess on two ResNet-50 cases
(the 7x7 stem, Cin = 3, and a 3x3 of layer1). test_report.py checks the performance targets; this
file checks that everything compiles, uses tensor cores where it should and fits shared memory.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # two compile runs shared by the module's tests

CCS = (80, 90)                     # sm_80 (A100), sm_90a (H100)
DTYPES = ("fp16", "bf16", "fp32")  # Triton's names of the data dtypes
CASES = ("stem", "l1.3x3.64")
MAX_SHARED = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    for cc in CCS:
        tmp = tmp_path_factory.mktemp(f"sm{cc}")
        env = dict(os.environ, TRITON_INTERPRET="0")
        proc = subprocess.run([sys.executable, "-m", "fastres.kernels.report", "--out", str(tmp), "--arch", str(cc),
                               "--dtype", ",".join(DTYPES), "--cases", ",".join(CASES)],
                              env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode == 3:
            pytest.skip(f"the report tool cannot compile for NVIDIA here: {proc.stderr.strip()[-500:]}")
        assert (tmp / "report.json").exists(), (
            f"sm_{cc}: report tool failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        out[cc] = json.loads((tmp / "report.json").read_text())
    return out


def _kernels(reports):
    """(module, kernel) of every @triton.jit kernel the modules with variants hold."""
    r = reports[CCS[0]]
    described = {v["module"] for v in r["variants"]}
    return sorted((m, k) for m, ks in r["kernels"].items() if m in described for k in ks)


def _where(cc, v):
    return f"sm_{cc} {v['kernel']} {v['case']} {v['dtype']} {v['epilogue']} {v['config']}"


def test_every_kernel_is_covered(reports):
    """A @triton.jit kernel added to a module must get variants (kernels/report_variants.py)."""
    for cc, r in reports.items():
        assert r["kernels"]["batchnorm"], "no @triton.jit kernels found in fastres.kernels.batchnorm"
        assert not [n for n in r["notes"] if "have no variant" in n], r["notes"]
        for module, kernel in _kernels(reports):
            got = {v["dtype"] for v in r["variants"] if v["kernel"] == kernel}
            assert got == set(DTYPES), f"sm_{cc} {module}.{kernel}: variants in {sorted(got)}, not all of {DTYPES}"


def test_compiles_for_sm80_sm90(reports):
    failed = [f"{_where(cc, v)}:\n{v['error']}" for cc, r in reports.items() for v in r["variants"] if "error" in v]
    assert not failed, "\n\n".join(failed)
    for cc, r in reports.items():
        assert r["target"] == (f"sm_{cc}a" if cc >= 90 else f"sm_{cc}")
        assert all(v["n_regs"] > 0 and v["ptx"] for v in r["variants"])


def test_conv_uses_tensor_cores_and_fits_shared_memory(reports):
    for cc, r in reports.items():
        rows = [v for v in r["variants"] if v["role"] == "conv" and "error" not in v]
        if not any(v["role"] == "conv" for v in r["variants"]):
            assert any(n.startswith("conv: ") for n in r["notes"]), "no conv variants and no note saying why"
            continue
        for v in rows:
            tensor_core = v["wgmma"] if cc == 90 else v["mma_sync"]   # Hopper: warpgroup MMA
            if v["dtype"] != "fp32" or v["constexprs"].get("PRECISION", "tf32") == "tf32":
                assert tensor_core, f"{_where(cc, v)}: no tensor-core MMA in the PTX"
            else:  # "ieee": full fp32 products, which tensor cores do not compute
                assert not (v["wgmma"] or v["mma_sync"]), f"{_where(cc, v)}: ieee precision compiled to MMA"
        for dt in DTYPES:
            used = [v["shared_bytes"] for v in rows if v["dtype"] == dt]
            assert used and min(used) <= MAX_SHARED[cc], f"sm_{cc} {dt}: shared memory {used}"


def test_batchnorm_kernels_fit_shared_memory(reports):
    for cc, r in reports.items():
        big = [_where(cc, v) for v in r["variants"] if v["role"] != "conv" and v.get("shared_bytes", 0) > 48 * 1024]
        assert not big, f"BatchNorm kernels above 48 KiB of shared memory: {big}"
