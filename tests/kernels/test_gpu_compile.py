"""Every Triton kernel of kernels/conv.py and kernels/batchnorm.py compiles for real NVIDIA GPUs.

The rest of the suite runs the kernels through Triton's interpreter when there is no GPU, which
never lowers them to PTX and cannot run bf16 at all. Here each kernel goes through the real
compiler (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas cubin) for sm_80 (A100) and sm_90 (H100), in
fp16, bf16 and fp32, with the constexpr flags, block sizes, warps and stages its host function
launches with on a GPU (for the conv, with configs of its GPU autotune list). No GPU is needed:
ptxas ships with Triton.

This module is also the compile script: the fixture runs it as `python test_gpu_compile.py OUT`
with TRITON_INTERPRET=0 (under the interpreter @triton.jit yields no compilable function) and a
fresh Triton cache; it compiles every variant in that one process and writes a JSON report,
which the tests check (one test per kernel).

Pointer dtypes come from the table below; the other arguments are classified from the kernel's
own signature. Integer arguments carry the values of a representative launch and are specialized
as Triton's launcher specializes them (1 -> constexpr, multiple of 16 -> divisibility hint; each
pointer is assumed 16-byte aligned, as torch allocations are), so the compiled code is the code a
launch of that shape would run.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # one ~40-90 s compile run shared by the module's tests

CCS = (80, 90)                    # sm_80 (A100), sm_90 (H100)
DTYPES = ("fp16", "bf16", "fp32")  # Triton's names of the data dtypes
MAX_SHARED = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100)

# Pointer arguments that are not of the data dtype. Every other pointer argument holds data
# (input, output, residual, gradient, BatchNorm weight/bias, running statistics: a model in
# fp16/bf16 keeps its parameters and buffers in that dtype).
FP32_PTRS = {  # statistics, per-channel scale/shift/bias, partial sums: always fp32
    "_conv_kernel": {"BIAS", "SCALE", "SHIFT", "PART"},
    "_tile_stats_kernel": {"part_ptr"},
    "_finalize_kernel": {"part_ptr", "mean_ptr", "invstd_ptr"},
    "_apply_kernel": {"mean_ptr", "invstd_ptr"},
    "_pack_mask_kernel": set(),
    "_bwd_tile_kernel": {"mean_ptr", "invstd_ptr", "part_ptr"},
    "_bwd_reduce_kernel": {"part_ptr", "dbeta_ptr", "dgamma_ptr"},
    "_bwd_dz_kernel": {"mean_ptr", "invstd_ptr", "sg_ptr", "sgx_ptr"},
}
UINT8_PTRS = {"mask_ptr"}  # the packed ReLU bit mask
# (When a flag is off the host passes some other tensor for that pointer, which the kernel never
# reads; its dtype does not change the code, so the table's dtype is used throughout.)
CONV_PTRS = {"X", "Wt", "BIAS", "SCALE", "SHIFT", "RES", "OUT", "PART"}  # batchnorm's end in _ptr
FLOAT_ARGS = {"momentum", "eps", "inv_n"}  # fp32 scalars; every other non-constexpr scalar is an int

KERNELS = sorted(FP32_PTRS)


# ------------------------------------------------------------------------------------------------
# the compile script (runs in the subprocess, TRITON_INTERPRET=0)
# ------------------------------------------------------------------------------------------------

def _conv_geometry(n, cin, h, cout, k, stride, pad):
    """Integer arguments of conv2d_nhwc for a square NHWC input and kernel (dilation 1)."""
    ho = (h + 2 * pad - k) // stride + 1
    return dict(M=n * ho * ho, COUT=cout, CIN=cin, H=h, W=h, HO=ho, WO=ho, K=k * k * cin, KW=k,
                STRIDE_H=stride, STRIDE_W=stride, PAD_H=pad, PAD_W=pad, DIL_H=1, DIL_W=1,
                sxn=h * h * cin, sxc=1, sxh=h * cin, sxw=cin,
                srn=ho * ho * cout, src=1, srh=ho * cout, srw=cout)


def _conv_variants():
    from fastres.kernels import conv

    geo = {"3x3": _conv_geometry(8, 64, 56, 64, 3, 1, 1),       # ResNet layer1 conv
           "1x1/2": _conv_geometry(8, 256, 56, 512, 1, 2, 0),   # downsample shortcut
           "stem": _conv_geometry(8, 3, 224, 64, 7, 2, 3),      # 7x7/2 stem: CIN=3, K=147 ragged
           "generic": {}}                                       # every int unspecialized
    off = dict(HAS_BIAS=False, HAS_SCALE=False, HAS_SHIFT=False, HAS_RES=False, RELU=False,
               WANT_STATS=False)
    # The epilogues conv_bn_act launches (kernels/conv_bn_act.py):
    train = dict(off, WANT_STATS=True)                                   # z + tile statistics
    train_bias = dict(train, HAS_BIAS=True)                              # ... conv with a bias
    block = dict(off, HAS_SCALE=True, HAS_SHIFT=True, HAS_RES=True, RELU=True)  # eval, end of block
    eval_relu = dict(off, HAS_SCALE=True, HAS_SHIFT=True, RELU=True)     # eval, inside a block
    eval_plain = dict(off, HAS_SCALE=True, HAS_SHIFT=True)               # eval, downsample branch
    recompute = dict(off, HAS_BIAS=True)                                 # backward: z again
    cfg = conv.GPU_CONFIGS
    # cc: [(dtype, epilogue, PRECISION, geometry, autotune config index)]. sm_90 runs all seven
    # autotune configs. fp32 is "tf32" by default (cudnn.allow_tf32); "ieee" (FMA, no tensor
    # cores) is compiled once, as it is the slowest compile (~10 s).
    plan = {
        90: [("bf16", train, "tf32", "3x3", 0), ("bf16", block, "tf32", "3x3", 4),
             ("bf16", eval_plain, "tf32", "1x1/2", 6), ("fp16", train_bias, "tf32", "stem", 1),
             ("fp16", recompute, "tf32", "generic", 3), ("fp32", eval_relu, "ieee", "3x3", 2),
             ("fp32", train, "tf32", "1x1/2", 5)],
        80: [("bf16", train, "tf32", "3x3", 3), ("bf16", block, "tf32", "1x1/2", 1),
             ("bf16", recompute, "tf32", "generic", 6), ("fp16", eval_relu, "tf32", "stem", 0),
             ("fp32", block, "tf32", "3x3", 4)],
    }
    for cc, rows in plan.items():
        for dt, flags, precision, g, i in rows:
            c = cfg[i]
            consts = dict(flags, PRECISION=precision, BLOCK_M=conv.BLOCK_M_GPU, **c.kwargs)
            yield ("_conv_kernel", cc, dt, consts, geo[g],
                   dict(num_warps=c.num_warps, num_stages=c.num_stages), f"{g} config{i}")


def _bn_variants():
    import torch
    from fastres.kernels import batchnorm as bn

    def ints(fmt, shape=(8, 64, 56, 56)):
        """Integer arguments of the batchnorm kernels for a tensor of `shape` in layout `fmt`."""
        z = torch.empty(shape, device="meta").contiguous(memory_format=fmt)
        m, c, hw, (s_n, s_hw, s_c), c_inner = bn._geometry(z)
        block_m, block_c = bn._reduce_blocks(m, c)
        return (dict(M=m, C=c, HW=hw, s_n=s_n, s_hw=s_hw, s_c=s_c, numel=z.numel(), C_INNER=c_inner,
                     T=-(-m // block_m)), dict(BLOCK_M=block_m, BLOCK_C=block_c))

    nhwc, nhwc_blocks = ints(torch.channels_last)
    nchw, _ = ints(torch.contiguous_format)
    _, small_blocks = ints(torch.channels_last, (2, 16, 1, 1))   # few rows and channels: small tiles
    flat = dict(BLOCK=bn.FLAT_BLOCK)
    merge = dict(BLOCK_T=bn.BLOCK_T, BLOCK_C=nhwc_blocks["BLOCK_C"])
    for cc in CCS:
        for dt in DTYPES:
            rows = [
                ("_tile_stats_kernel", nhwc_blocks, nhwc, "NHWC"),
                ("_tile_stats_kernel", small_blocks, nchw, "NCHW small tiles"),
                ("_finalize_kernel", dict(merge, HAS_RUNNING=True), nhwc, "running stats in data dtype"),
                ("_apply_kernel", dict(flat, HAS_W=True, HAS_B=True, HAS_RES=True, RELU=True,
                                       SAVE_MASK=True), nhwc, "NHWC"),
                ("_apply_kernel", dict(flat, HAS_W=False, HAS_B=False, HAS_RES=False, RELU=False,
                                       SAVE_MASK=False), nchw, "NCHW"),
                ("_pack_mask_kernel", flat, nhwc, "NHWC"),
                ("_bwd_tile_kernel", dict(nhwc_blocks, RELU=True), nhwc, "NHWC"),
                ("_bwd_tile_kernel", dict(small_blocks, RELU=False), nchw, "NCHW small tiles"),
                ("_bwd_dz_kernel", dict(flat, HAS_W=True, TRAINING=True, RELU=True, NEED_DRES=True),
                 nhwc, "NHWC"),
                ("_bwd_dz_kernel", dict(flat, HAS_W=False, TRAINING=False, RELU=False,
                                        NEED_DRES=False), nchw, "NCHW"),
            ]
            for name, consts, scalars, label in rows:
                # host launches give no num_warps / num_stages: the backend defaults (options={})
                yield name, cc, dt, consts, scalars, {}, label
        # only fp32 data: no running statistics to update / fp32 partial sums alone
        yield ("_finalize_kernel", cc, "fp32", dict(merge, HAS_RUNNING=False), nhwc, {},
               "no running stats")
        yield "_bwd_reduce_kernel", cc, "fp32", merge, nhwc, {}, "fp32 partials"


def _signature(fn, name, dtype, consts, scalars):
    """(signature, constexprs, attrs) of ASTSource for kernel `fn` with data dtype `dtype`."""
    sig, constexprs, attrs = {}, {}, {}
    for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            sig[arg], constexprs[(i,)] = "constexpr", consts[arg]   # KeyError: a flag left unset
        elif arg in CONV_PTRS or arg.endswith("_ptr"):
            sig[arg] = "*" + ("fp32" if arg in FP32_PTRS[name] else "u8" if arg in UINT8_PTRS else dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in FLOAT_ARGS:
            sig[arg] = "fp32"
        elif scalars.get(arg) == 1:        # the launcher turns an int 1 into a constant
            sig[arg], constexprs[(i,)] = "constexpr", 1
        else:
            sig[arg] = "i32"
            if arg in scalars and scalars[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _compile_all(out_path):
    import time

    report = {"skip": None, "kernels": [], "helpers": [], "results": []}
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas_version

        if "nvidia" not in backends:
            raise RuntimeError(f"no NVIDIA backend in this Triton (backends: {sorted(backends)})")
        version = get_ptxas_version(90)   # runs ptxas: fails if it is missing
        report["ptxas"] = next((ln for ln in version.splitlines() if "release" in ln), version.strip())
    except Exception as e:  # noqa: BLE001 - any failure here means: cannot compile for NVIDIA
        report["skip"] = f"Triton's NVIDIA backend / ptxas is unavailable: {type(e).__name__}: {e}"
        with open(out_path, "w") as f:
            json.dump(report, f)
        return

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from fastres.kernels import batchnorm, conv

    jitted = {k: v for mod in (conv, batchnorm) for k, v in vars(mod).items() if isinstance(v, JITFunction)}
    # device helpers: jit functions called by another jit function (compiled inside their callers)
    helpers = {k for k in jitted if any(k + "(" in f.src for o, f in jitted.items() if o != k)}
    report["kernels"] = sorted(set(jitted) - helpers)
    report["helpers"] = sorted(helpers)

    for name, cc, dt, consts, scalars, options, label in [*_conv_variants(), *_bn_variants()]:
        fn = jitted[name]
        entry = dict(kernel=name, cc=cc, dtype=dt, label=label, options=options,
                     constexprs={k: v for k, v in consts.items()})
        t0 = time.perf_counter()
        try:
            sig, constexprs, attrs = _signature(fn, name, dt, consts, scalars)
            k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                               options=options)
            ptx = k.asm["ptx"]
            entry.update(ok=True, shared=k.metadata.shared, cubin_bytes=len(k.asm["cubin"]),
                         wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                         target=f"sm_{cc}" + ("a" if cc == 90 else ""))
        except Exception as e:  # noqa: BLE001 - recorded, reported by the tests
            msg = f"{type(e).__name__}: {e}"
            entry.update(ok=False, error=msg[-4000:])
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report["results"].append(entry)
        print(f"{name} sm_{cc} {dt} {label}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)",
              file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f)


# ------------------------------------------------------------------------------------------------
# the tests (run under pytest, any TRITON_INTERPRET)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_compile")
    out = tmp / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "triton-cache"))
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and out.exists(), (
        f"compile script failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    rep = json.loads(out.read_text())
    if rep["skip"]:
        pytest.skip(rep["skip"])
    return rep


def _results(report, kernel):
    return [r for r in report["results"] if r["kernel"] == kernel]


def test_every_kernel_is_covered(report):
    """A @triton.jit kernel added to conv.py / batchnorm.py must get compile variants here."""
    assert report["kernels"], "no @triton.jit kernels found in fastres.kernels.conv / .batchnorm"
    assert sorted(report["kernels"]) == KERNELS, (
        f"kernels in the modules {report['kernels']} != kernels this test covers {KERNELS}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_for_sm80_sm90(report, kernel):
    rows = _results(report, kernel)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(
        f"{kernel} sm_{r['cc']} {r['dtype']} {r['label']} constexprs={r['constexprs']} "
        f"options={r['options']}:\n{r['error']}" for r in failed)
    data_kernel = any(r["dtype"] != "fp32" for r in rows)
    want = {(cc, dt) for cc in CCS for dt in (DTYPES if data_kernel else ("fp32",))}
    assert {(r["cc"], r["dtype"]) for r in rows} == want
    assert all(r["cubin_bytes"] > 0 for r in rows)


def test_conv_uses_tensor_cores_and_fits_shared_memory(report):
    rows = [r for r in _results(report, "_conv_kernel") if r["ok"]]
    assert rows, "no conv kernel compiled"
    for r in rows:
        what = f"sm_{r['cc']} {r['dtype']} {r['label']} {r['constexprs']}"
        tensor_core = r["wgmma"] if r["cc"] == 90 else r["mma_sync"]   # Hopper: warpgroup MMA
        if r["dtype"] != "fp32" or r["constexprs"]["PRECISION"] == "tf32":
            assert tensor_core, f"{what}: no tensor-core MMA in the PTX"
        else:  # "ieee": full fp32 products, which tensor cores do not compute
            assert not (r["wgmma"] or r["mma_sync"]), f"{what}: ieee precision compiled to MMA"
    # The autotuner drops configs that need more shared memory than a block may have; each data
    # dtype must keep a launchable config on each target.
    for cc in CCS:
        for dt in DTYPES:
            used = [r["shared"] for r in rows if (r["cc"], r["dtype"]) == (cc, dt)]
            assert used and min(used) <= MAX_SHARED[cc], f"sm_{cc} {dt}: shared memory {used}"


if __name__ == "__main__":
    _compile_all(sys.argv[1])
