"""What the host functions of fastres.kernels launch, as variants for the compiled-kernel report (report.py).

For a conv shape `case` (a fastres.kernels.report.RESNET50_CASES entry: dict(name, n, cin, h, w, cout,
kh, kw, stride, pad), dilation 1) and a data dtype ("bf16", "fp16", "fp32"), each function of VARIANTS
lists the launches one host module makes there, read from that module's own launch plans: the conv
(conv.py: one variant per epilogue and per config the launcher may pick after pruning) and BatchNorm
over that conv's NHWC output (batchnorm.py: every launch of its host functions). Importing this
module imports triton (through the modules it describes).

A variant (:func:`describe` builds one) is a dict with keys kernel, fn (the JITFunction), role ("conv",
"bn_reduce", "bn_merge", "bn_elementwise"), epilogue (a label), config (meta-parameters + num_warps +
num_stages), signature (argument -> Triton type: "*bf16", "*fp32", "*u8", "*i32", "i32", "fp32",
"constexpr"), constexprs (argument -> value), aligned (arguments 16-byte aligned / divisible by 16),
grid (programs), bytes (minimum HBM traffic), flops.
"""
from __future__ import annotations

import inspect
from typing import List

import torch

from fastres.kernels import batchnorm as _bn
from fastres.kernels import conv as _conv
from fastres.kernels import shapes as _shapes
from fastres.kernels.batchnorm_kernels import (
    _apply_kernel,
    _bwd_dz_kernel,
    _bwd_reduce_kernel,
    _bwd_tile_kernel,
    _finalize_kernel,
    _pack_mask_kernel,
    _tile_stats_kernel,
)
from fastres.kernels.conv_kernel import BLOCK_M_GPU, GPU_CONFIGS, MAX_SHARED_SM90, _conv_kernel, prune_configs

__all__ = ["VARIANTS", "conv_variants", "batchnorm_variants", "describe", "case_out_hw", "ELEM_BYTES"]

ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def case_out_hw(case):
    """(Ho, Wo) of a case (dilation 1)."""
    s, p = (case["stride"],) * 2, (case["pad"],) * 2
    return _shapes.conv_out_hw(case["h"], case["w"], case["kh"], case["kw"], s, p)


def _constexpr_flags(fn):
    """Per argument of a @triton.jit function: is it tl.constexpr (also under the interpreter, whose
    InterpretedFunction has no .params)."""
    if hasattr(fn, "params"):
        return [p.is_constexpr for p in fn.params]
    params = inspect.signature(fn.fn).parameters.values()
    return [p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation) for p in params]


def describe(fn, *, role, epilogue, meta, ptrs, ints, floats=(), flags=None, grid, nbytes, flops,
             num_warps=4, num_stages=3, kernel=None):
    """A variant for `fn` launched as a host function would launch it.

    meta: block-size meta-parameters (constexpr); flags: the epilogue's constexpr switches; ptrs:
    pointer argument -> Triton type ("*fp32"), each taken 16-byte aligned (torch allocations are);
    ints: integer argument -> the value of the launch, specialized as Triton's launcher does (1 ->
    constexpr, a multiple of 16 -> aligned); floats: fp32 scalar arguments. Every argument of `fn`
    must be in exactly one of them."""
    consts = dict(flags or {}, **meta)
    signature, constexprs, aligned = {}, {}, []
    for arg, is_constexpr in zip(fn.arg_names, _constexpr_flags(fn)):
        if is_constexpr:
            if arg not in consts:
                raise KeyError(f"{fn.__name__}: constexpr {arg} has no value in meta/flags")
            signature[arg], constexprs[arg] = "constexpr", consts[arg]
        elif arg in ptrs:
            signature[arg] = ptrs[arg]
            aligned.append(arg)
        elif arg in floats:
            signature[arg] = "fp32"
        elif arg in ints:
            v = int(ints[arg])
            if v == 1:
                signature[arg], constexprs[arg] = "constexpr", 1
            else:
                signature[arg] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    aligned.append(arg)
        else:
            raise KeyError(f"{fn.__name__}: argument {arg} is neither a pointer, an int nor a float here")
    return dict(kernel=kernel or fn.__name__, fn=fn, role=role, epilogue=epilogue,
                config=dict(meta, num_warps=num_warps, num_stages=num_stages), signature=signature,
                constexprs=constexprs, aligned=aligned, grid=int(grid), bytes=int(nbytes), flops=int(flops))


# ---- the conv (conv.py) ------------------------------------------------------------------------------

# The epilogues conv_bn_act launches on a GPU, by the report tool's names.
CONV_EPILOGUES = {
    "stats": dict(has_bias=False, has_scale=False, has_shift=False, has_res=False, relu=False, want_stats=True),
    "folded": dict(has_bias=False, has_scale=True, has_shift=True, has_res=False, relu=True, want_stats=False),
    "folded_residual_relu": dict(has_bias=False, has_scale=True, has_shift=True, has_res=True, relu=True,
                                 want_stats=False),
}
_CONV_FP32_PTRS = {"BIAS", "SCALE", "SHIFT", "PART"}
_CONV_PTRS = ("X", "Wt", "BIAS", "SCALE", "SHIFT", "RES", "OUT", "PART")


def conv_variants(case: dict, dtype: str) -> List[dict]:
    """What a GPU launch of conv2d_nhwc compiles to at `case`: one variant per (epilogue, config the
    launcher may pick after pruning), fp32 as TF32 (PyTorch's default conv flag), a channels_last
    residual. constexprs hold the meta-parameters and the ints the launcher specialises (== 1);
    bytes is the minimum HBM traffic, flops 2 * M * Cout * kh * kw * Cin; each variant also has the
    case's name."""
    if dtype not in ELEM_BYTES:
        raise ValueError(f"conv_variants: dtype must be one of {sorted(ELEM_BYTES)}, got {dtype!r}")
    es = ELEM_BYTES[dtype]
    st, pad = (case["stride"],) * 2, (case["pad"],) * 2
    geo = _conv._geometry(case["n"], case["cin"], case["h"], case["w"], case["cout"], case["kh"], case["kw"], st,
                          pad, (1, 1))
    m, cout = geo["M"], geo["COUT"]
    configs = prune_configs(GPU_CONFIGS, geo["CIN_P"], cout, es, MAX_SHARED_SM90)
    x_bytes = case["n"] * geo["H"] * geo["W"] * geo["CIN_P"] * es     # as the kernel reads it (padded / rewritten)
    w_bytes = cout * geo["K_P"] * es
    tiles_m = _shapes.cdiv(m, BLOCK_M_GPU)
    ptrs = {a: "*" + ("fp32" if a in _CONV_FP32_PTRS else dtype) for a in _CONV_PTRS}
    out = []
    for epi, opts in CONV_EPILOGUES.items():
        flags = _conv._flags(geo, precision="tf32", block_m=BLOCK_M_GPU, **opts)
        nbytes = x_bytes + w_bytes + m * cout * es
        nbytes += m * cout * es if opts["has_res"] else 0
        nbytes += tiles_m * 3 * cout * 4 if opts["want_stats"] else 0
        nbytes += 2 * cout * 4 if opts["has_scale"] else 0
        for cfg in configs:
            v = describe(_conv_kernel, role="conv", epilogue=epi, meta=cfg.kwargs, flags=flags, ptrs=ptrs,
                         ints=geo, grid=_conv._grid_size(m, cout, BLOCK_M_GPU, cfg.kwargs["BLOCK_N"]),
                         nbytes=nbytes, flops=2 * m * cout * case["kh"] * case["kw"] * case["cin"],
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            out.append(dict(v, name=case.get("name")))
    return out


# ---- BatchNorm (batchnorm.py) ------------------------------------------------------------------------

def batchnorm_variants(case: dict, dtype: str) -> List[dict]:
    """Every launch the host functions of batchnorm.py make on the NHWC output (n, cout, Ho, Wo) of the
    conv `case`, data dtype `dtype` (BN parameters and running statistics fp32, as under autocast).
    bytes / flops are each launch's minimum traffic and a count of its arithmetic per element."""
    ho, wo = case_out_hw(case)
    # the conv's output as batchnorm.py's host functions read it: NHWC, as the Triton conv writes it
    z = torch.empty((case["n"], case["cout"], ho, wo), device="meta", memory_format=torch.channels_last)
    m, c, hw, (s_n, s_hw, s_c), c_inner, _ = _bn._geometry(_bn._m(z))
    numel, es = m * c, ELEM_BYTES[dtype]
    d, f = "*" + dtype, "*fp32"
    geo = dict(M=m, C=c, HW=hw, s_n=s_n, s_hw=s_hw, s_c=s_c)
    flat = dict(numel=numel, C=c, C_INNER=c_inner)
    out = []

    def add(fn, role, epilogue, grid, meta, ptrs, ints, nbytes, flops, floats=(), flags=None):
        out.append(describe(fn, role=role, epilogue=epilogue, meta=meta, flags=flags, ptrs=ptrs, ints=ints,
                            floats=floats, grid=grid[0] * (grid[1] if len(grid) > 1 else 1),
                            nbytes=nbytes, flops=flops, num_warps=_bn.NUM_WARPS, num_stages=_bn.NUM_STAGES))

    # forward statistics: bn_partials (bn_stats) and the finalize of the conv's own partials
    tgrid, tmeta = _bn._reduce_plan(m, c)
    add(_tile_stats_kernel, "bn_reduce", "bn_partials", tgrid, tmeta, dict(z_ptr=d, part_ptr=f), geo,
        numel * es + tgrid[0] * 3 * c * 4, 4 * numel)
    # the conv's statistics: one partial row per BLOCK_M_GPU output rows
    for src, t in (("conv partials", _shapes.cdiv(m, BLOCK_M_GPU)), ("bn_partials", tgrid[0])):
        grid, meta, chunk = _bn._merge_plan(t, c)
        for running in (True, False):
            ptrs = dict(part_ptr=f, ws_ptr=f, count_ptr="*i32", mean_ptr=f, invstd_ptr=f, rmean_ptr=f, rvar_ptr=f)
            add(_finalize_kernel, "bn_merge", f"{src}{', running stats' if running else ''}", grid, meta, ptrs,
                dict(T=t, C=c, G=grid[0], CHUNK=chunk), (t + 2 * grid[0]) * 3 * c * 4 + (6 if running else 2) * c * 4,
                12 * t * c, floats=("momentum", "eps"), flags=dict(HAS_RUNNING=running))
            if src == "bn_partials":
                break   # bn_stats: the same code at another grid, running stats on
    # forward apply (training: z -> y, optional residual, ReLU and mask for the backward)
    fgrid, fmeta = _bn._flat_plan(numel)
    vec = dict(mean_ptr=f, invstd_ptr=f, w_ptr=f, b_ptr=f)
    for label, res, relu in (("relu+mask", False, True), ("add+relu+mask", True, True), ("plain", False, False)):
        add(_apply_kernel, "bn_elementwise", label, fgrid, fmeta,
            dict(vec, z_ptr=d, res_ptr=d, y_ptr=d, mask_ptr="*u8"), flat,
            numel * es * (2 + res) + (numel // 8 if relu else 0) + 4 * c * 4, numel * (2 + res + relu),
            flags=dict(HAS_W=True, HAS_B=True, HAS_RES=res, RELU=relu, SAVE_MASK=relu))
    add(_pack_mask_kernel, "bn_elementwise", "mask of y", fgrid, fmeta, dict(y_ptr=d, mask_ptr="*u8"),
        dict(numel=numel), numel * es + numel // 8, numel)
    # backward: tile sums, their merge, dz
    bgrid, bmeta = _bn._reduce_plan(m, c)
    for relu in (True, False):
        add(_bwd_tile_kernel, "bn_reduce", "relu mask" if relu else "plain", bgrid, bmeta,
            dict(g_ptr=d, z_ptr=d, mask_ptr="*u8", mean_ptr=f, invstd_ptr=f, part_ptr=f), geo,
            2 * numel * es + (numel // 8 if relu else 0) + bgrid[0] * 2 * c * 4, 6 * numel, flags=dict(RELU=relu))
    grid, meta, chunk = _bn._merge_plan(bgrid[0], c)
    add(_bwd_reduce_kernel, "bn_merge", "dgamma, dbeta", grid, meta,
        dict(part_ptr=f, ws_ptr=f, count_ptr="*i32", dbeta_ptr=f, dgamma_ptr=f),
        dict(T=bgrid[0], C=c, G=grid[0], CHUNK=chunk), (bgrid[0] + 2 * grid[0]) * 2 * c * 4 + 2 * c * 4,
        2 * bgrid[0] * c)
    ptrs = dict(g_ptr=d, z_ptr=d, mask_ptr="*u8", mean_ptr=f, invstd_ptr=f, w_ptr=f, sg_ptr=f, sgx_ptr=f,
                dz_ptr=d, dres_ptr=d)
    for label, training, relu, dres in (("train, relu, dres", True, True, True), ("train, relu", True, True, False),
                                        ("train, plain", True, False, False), ("eval, relu", False, True, False)):
        add(_bwd_dz_kernel, "bn_elementwise", label, fgrid, fmeta, ptrs, flat,
            numel * es * (2 + training + dres) + (numel // 8 if relu else 0) + 6 * c * 4,
            numel * (8 if training else 2), floats=("inv_n",),
            flags=dict(HAS_W=True, TRAINING=training, RELU=relu, NEED_DRES=dres))
    return out


# fastres.kernels.<module> -> the variants of its launches; the report lists each module's @triton.jit kernels
# and notes those without a variant.
VARIANTS = {"conv": conv_variants, "batchnorm": batchnorm_variants}
