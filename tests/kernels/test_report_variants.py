"""Tests of kernels/report_variants.py: the launches the report tool compiles, described without compiling.

The conv's variants (one per epilogue and pruned config) against its launch geometry, the variant
description's specialization of integer arguments, and every BatchNorm reduction launch at every
ResNet-50 batch-256 case on at least one program per SM. The compiling runs are test_report.py and
test_gpu_compile.py.
"""
import inspect
import math

import pytest

triton = pytest.importorskip("triton")
from fastres.kernels import conv as kconv  # noqa: E402
from fastres.kernels import conv_kernel as ck  # noqa: E402
from fastres.kernels import report as rep  # noqa: E402
from fastres.kernels import report_variants as rv  # noqa: E402

SMS = 132


def _case(cin, h, cout, k, s, n=256):
    return dict(name=f"{cin}x{h}-{cout}k{k}s{s}", n=n, cin=cin, h=h, w=h, cout=cout, kh=k, kw=k, stride=s,
                pad=k // 2)


def _where(v):
    return f"{v['kernel']} {v['case']} {v['dtype']} {v['epilogue']} {v['config']}"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_conv_variants(dtype):
    kernel = ck._conv_kernel
    for cin, h, cout, k, s in [(64, 56, 64, 3, 1), (256, 56, 64, 1, 1), (3, 224, 64, 7, 2), (256, 56, 512, 1, 2)]:
        case = _case(cin, h, cout, k, s)
        vs = rv.conv_variants(case, dtype)
        cin_p = kconv._cin_p(cin)
        cfgs = ck.prune_configs(ck.GPU_CONFIGS, cin_p, cout, 4 if dtype == "fp32" else 2, ck.MAX_SHARED_SM90)
        assert len(vs) == 3 * len(cfgs) > 0
        assert {v["epilogue"] for v in vs} == {"stats", "folded", "folded_residual_relu"}
        ho = (h + 2 * (k // 2) - k) // s + 1
        m = 256 * ho * ho
        for v in vs:
            assert v["kernel"] == "_conv_kernel" and v["fn"] is kernel and v["role"] == "conv"
            assert list(v["signature"]) == list(inspect.signature(kernel.fn).parameters)
            assert v["signature"]["X"] == "*" + dtype and v["signature"]["PART"] == "*fp32"
            assert all(v["signature"][a] == "constexpr" for a in v["constexprs"])
            s2d = cin <= 4 and s == 2                      # the stem: space-to-depth, 4x4 stride 1, no padding
            assert v["constexprs"]["BLOCK_M"] == ck.BLOCK_M_GPU and v["constexprs"]["KH"] == (4 if s2d else k)
            assert v["constexprs"]["WANT_STATS"] == (v["epilogue"] == "stats")
            assert v["constexprs"]["HAS_RES"] == (v["epilogue"] == "folded_residual_relu")
            assert v["constexprs"]["MASK_HW"] == (k > 1 and not s2d)
            assert v["signature"]["sxw"] == ("constexpr" if cin_p == 1 else "i32") and "sxw" in v["aligned"]
            cfg = v["config"]
            assert cfg["BLOCK_N"] == v["constexprs"]["BLOCK_N"] and cfg["BLOCK_K"] == v["constexprs"]["BLOCK_K"]
            assert v["grid"] == math.ceil(m / ck.BLOCK_M_GPU) * math.ceil(cout / cfg["BLOCK_N"])
            assert v["flops"] == 2 * m * cout * k * k * cin
            es = 4 if dtype == "fp32" else 2
            assert v["bytes"] >= (256 * h * h * cin + cout * k * k * cin + m * cout) * es
    with pytest.raises(ValueError, match="dtype"):
        rv.conv_variants(_case(64, 56, 64, 3, 1), "fp64")


def test_describe_specializes_like_the_launcher():
    from fastres.kernels import batchnorm_kernels as k

    v = rv.describe(k._apply_kernel, role="bn_elementwise", epilogue="x", meta=dict(BLOCK=1024),
                    flags=dict(HAS_W=True, HAS_B=False, HAS_RES=False, RELU=True, SAVE_MASK=True),
                     ptrs={a: "*fp32" for a in k._apply_kernel.arg_names if a.endswith("_ptr")},
                     ints=dict(numel=4800, C=64, C_INNER=1), grid=5, nbytes=10, flops=10)
    assert v["signature"]["C_INNER"] == "constexpr" and v["constexprs"]["C_INNER"] == 1   # an int 1
    assert v["signature"]["numel"] == "i32" and {"numel", "C", "z_ptr", "mask_ptr"} <= set(v["aligned"])
    assert v["constexprs"]["BLOCK"] == 1024 and v["config"] == dict(BLOCK=1024, num_warps=4, num_stages=3)
    with pytest.raises(KeyError, match="numel"):
        rv.describe(k._pack_mask_kernel, role="bn_elementwise", epilogue="x", meta=dict(BLOCK=8),
                     ptrs=dict(y_ptr="*fp32", mask_ptr="*u8"), ints={}, grid=1, nbytes=1, flops=1)


def test_batchnorm_variants_fill_the_gpu_at_every_case():
    """Without compiling: every BatchNorm reduction launch at every ResNet-50 batch-256 case."""
    for case in rep.RESNET50_CASES:
        for v in rv.batchnorm_variants(case, "bf16"):
            if v["role"] in ("bn_reduce", "bn_merge"):
                assert v["grid"] >= SMS, f"{_where(dict(v, case=case['name'], dtype='bf16'))}: {v['grid']}"
