"""fastres._C (csrc/) and the "cuda" backend of conv_bn_act (fastres/ops/cuda_impl.py).

Without a GPU: the three ops are registered with their schemas, their fake implementations give the
right shapes / dtypes / layouts, bad input raises errors that name what was expected, the C++ library
coexists with the Python custom ops in either import order. With a GPU (@pytest.mark.gpu): every op
against a float64 reference at ResNet-50 shapes and odd ones (C not a multiple of 8, ragged rows,
batch 1, misaligned pointers) with outputs poisoned, running statistics against nn.BatchNorm2d,
bitwise reproducibility, CUDA graph replay, opcheck, torch.compile, the whole conv_bn_act op against
the torch backend, and the kernels under compute-sanitizer.
"""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from fastres import _ext, backend
from fastres.kernels.alloc import poisoned
from fastres.layout import pack_relu_mask, unpack_relu_mask

BUILT, WHY = _ext.status()
pytestmark = pytest.mark.skipif(not BUILT, reason=f"fastres._C is not built: {WHY}")
if BUILT:
    from fastres.backends import cuda as ci

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5

# (N, C, H, W). ResNet-50's BatchNorm inputs at batch 32, and shapes that take the scalar paths
# (C % 8 != 0), ragged row counts, one row, one channel.
RESNET50 = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 128, 28, 28), (32, 512, 28, 28),
            (32, 1024, 14, 14), (32, 2048, 7, 7)]
ODD = [(3, 5, 7, 9), (2, 12, 5, 5), (4, 20, 3, 3), (5, 64, 13, 11), (1, 24, 3, 3), (2, 3, 1, 1),
       (7, 1, 4, 5), (2, 40, 1, 33), (1, 8, 1, 1), (3, 2056, 3, 3)]
SCHEMAS = {
    "bn_stats": "fastres::bn_stats(Tensor z, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
                "float momentum, float eps) -> (Tensor mean, Tensor invstd)",
    "bn_apply": "fastres::bn_apply(Tensor z, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
                "Tensor? residual, bool relu, bool save_mask) -> (Tensor y, Tensor mask)",
    "bn_backward": "fastres::bn_backward(Tensor grad_y, Tensor z, Tensor mask, Tensor mean, "
                   "Tensor invstd, Tensor? weight, bool training, bool relu, bool need_dres) "
                   "-> (Tensor dz, Tensor dgamma, Tensor dbeta, Tensor dres)",
}


def ids(shape):
    return "x".join(map(str, shape))


def rand_z(shape, dtype, device="cuda", misalign=False):
    """Channels_last data with per-channel offsets and spreads; `misalign` shifts the data pointer by
    one element (not 16-byte aligned: the scalar paths)."""
    n, c, h, w = shape
    mu = torch.randn(c, device=device) * 2
    sd = torch.rand(c, device=device) * 1.5 + 0.5
    v = (torch.randn(n, h, w, c, device=device) * sd + mu).to(dtype)
    if misalign:
        base = torch.empty(v.numel() + 1, dtype=dtype, device=device)
        base[1:] = v.reshape(-1)
        v = base[1:].view(n, h, w, c)
    z = v.permute(0, 3, 1, 2)
    assert z.is_contiguous(memory_format=CL)
    return z


def chan(t):
    return t.double()[None, :, None, None]


# ------------------------------------------------------------------------------------------------
# without a GPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_registered_with_schema_and_kernels(name):
    op = getattr(torch.ops.fastres, name).default
    assert str(op._schema) == SCHEMAS[name]
    for key in ("CUDA", "CPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), f"{name}: no fake impl"


def _fake_inputs(shape, dtype):
    n, c, h, w = shape
    z = torch.empty(shape, dtype=dtype, device="cuda").contiguous(memory_format=CL)
    vec = torch.empty(c, device="cuda")
    return z, vec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 12, 5, 3), (1, 5, 1, 1), (4, 64, 7, 7)], ids=ids)
def test_fake_outputs(shape, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    nbytes = (math.prod(shape) + 7) // 8
    with FakeTensorMode():
        z, vec = _fake_inputs(shape, dtype)
        mean, invstd = torch.ops.fastres.bn_stats(z, vec, vec.clone(), 0.1, EPS)
        for t in (mean, invstd):
            assert t.shape == (shape[1],) and t.dtype == torch.float32 and t.device.type == "cuda"
        for relu, save in [(True, True), (True, False), (False, True)]:
            y, mask = torch.ops.fastres.bn_apply(z, mean, invstd, vec, vec, z, relu, save)
            assert y.shape == shape and y.dtype == dtype and y.is_contiguous(memory_format=CL)
            assert mask.dtype == torch.uint8 and mask.shape == ((nbytes,) if relu and save else (0,))
        mask = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        for need_dres in (True, False):
            dz, dg, db, dres = torch.ops.fastres.bn_backward(z, z, mask, mean, invstd, None, True, True,
                                                             need_dres)
            assert dz.shape == shape and dz.dtype == dtype and dz.is_contiguous(memory_format=CL)
            assert dg.shape == db.shape == (shape[1],) and dg.dtype == db.dtype == torch.float32
            if need_dres:
                assert dres.shape == shape and dres.dtype == dtype and dres.is_contiguous(memory_format=CL)
            else:
                assert dres.numel() == 0


def _cpu_args(shape=(2, 12, 3, 3), dtype=torch.float32):
    z = torch.randn(shape, dtype=dtype).contiguous(memory_format=CL)
    c = shape[1]
    return z, torch.randn(c), torch.rand(c) + 0.5


def test_cpu_tensors_raise_clear_error():
    z, mean, invstd = _cpu_args()
    mask = torch.zeros((z.numel() + 7) // 8, dtype=torch.uint8)
    calls = [
        lambda: torch.ops.fastres.bn_stats(z, None, None, 0.1, EPS),
        lambda: torch.ops.fastres.bn_apply(z, mean, invstd, None, None, None, True, True),
        lambda: torch.ops.fastres.bn_backward(z, z, mask, mean, invstd, None, True, True, True),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"expected tensors on a CUDA device.*got z on cpu"):
            call()


def test_bad_input_errors_name_what_was_expected():
    z, mean, invstd = _cpu_args()
    c = z.shape[1]
    ops = torch.ops.fastres
    cases = [
        (lambda: ops.bn_stats(z.contiguous(), None, None, 0.1, EPS), r"channels_last"),
        (lambda: ops.bn_stats(z.double(), None, None, 0.1, EPS), r"float32, float16 or bfloat16.*Double"),
        (lambda: ops.bn_stats(z[0], None, None, 0.1, EPS), r"4-D"),
        (lambda: ops.bn_stats(z, mean, None, 0.1, EPS), r"running_mean and running_var together"),
        (lambda: ops.bn_stats(z, mean[:3], invstd[:3], 0.1, EPS), rf"running_mean of shape \({c},\)"),
        (lambda: ops.bn_stats(torch.empty(2, c, 0, 3).contiguous(memory_format=CL), None, None, 0.1, EPS), r"at least one value per channel"),
        (lambda: ops.bn_apply(z, mean.double(), invstd, None, None, None, False, False),
         r"mean of dtype float32"),
        (lambda: ops.bn_apply(z, mean, invstd[:2], None, None, None, False, False),
         rf"invstd of shape \({c},\)"),
        (lambda: ops.bn_apply(z, mean, invstd, mean[:2], None, None, False, False),
         rf"weight of shape \({c},\)"),
        (lambda: ops.bn_apply(z, mean, invstd, None, None, z[:1], False, False), r"residual of shape"),
        (lambda: ops.bn_apply(z, mean, invstd, None, None, z.half(), False, False),
         r"residual of dtype Float"),
        (lambda: ops.bn_backward(z, z, torch.zeros(3, dtype=torch.uint8), mean, invstd, None, True,
                                 True, False), r"packed ReLU mask.*\d+ bytes"),
        (lambda: ops.bn_backward(z.half(), z, z, mean, invstd, None, True, False, False),
         r"grad_y of dtype Float"),
    ]
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call()


def test_set_poison_reaches_the_extension():
    prev = ci._C._set_poison(False)
    try:
        with poisoned():
            ci._sync_poison()
            assert ci._C._set_poison(True) is True
        ci._sync_poison()
        assert ci._C._set_poison(False) is False
    finally:
        ci._C._set_poison(prev)


@pytest.mark.parametrize("order", ["custom_ops_first", "extension_first"])
def test_torch_library_coexists_with_python_custom_ops(order):
    """TORCH_LIBRARY(fastres) in C++ and torch.library.custom_op("fastres::...") in Python, both orders."""
    so = _ext.module().__file__
    if order == "extension_first":  # load the .so by path before the fastres package exists
        code = f"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("fastres._C", {so!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["fastres._C"] = mod
assert torch._C._dispatch_has_kernel_for_dispatch_key("fastres::bn_stats", "CUDA")
import fastres.ops.conv_bn_act, fastres.backends.cuda
"""
    else:
        code = """
import torch
import fastres.ops.conv_bn_act
assert "fastres._C" not in __import__("sys").modules
import fastres._C, fastres.backends.cuda
"""
    code += """
for name in ("bn_stats", "bn_apply", "bn_backward", "conv_bn_act", "conv_bn_act_backward"):
    getattr(torch.ops.fastres, name).default
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 16, 1, 1), (1, 1, 5, 3), (2, 8, 2, 2)], ids=ids)
def test_mask_repacked_from_nchw_to_nhwc_order(shape):
    y = torch.randn(shape)
    m = ci.mask_nchw_to_nhwc(pack_relu_mask(y), shape)
    assert torch.equal(m, pack_relu_mask(y.contiguous(memory_format=CL)))


def test_supports():
    x, w = torch.randn(2, 3, 4, 4), torch.randn(4, 3, 1, 1)
    assert ci.conv_bn_act_supports(x, w, None, [1, 1], [0, 0], [1, 1], 1, True, True) is None
    why = ci.conv_bn_act_supports(x.double(), w.double(), None, [1, 1], [0, 0], [1, 1], 1, True, True)
    assert "float64" in why


# ------------------------------------------------------------------------------------------------
# GPU: the ops against float64 references (outputs poisoned)
# ------------------------------------------------------------------------------------------------

def ref_stats(z):
    var, mean = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    return mean, var


def check_stats(z, momentum=0.1, running_dtype=torch.float32):
    c = z.shape[1]
    n = z.numel() // c
    rm0 = torch.randn(c, device=z.device).to(running_dtype)
    rv0 = (torch.rand(c, device=z.device) + 0.5).to(running_dtype)
    rm, rv = rm0.clone(), rv0.clone()
    mean, invstd = ci.bn_stats(z, rm, rv, momentum, EPS)
    m_ref, v_ref = ref_stats(z)
    spread = v_ref.sqrt().max().item() + 1e-3
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-5, atol=1e-5 * spread)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(v_ref + EPS), rtol=1e-5, atol=0)
    rtol = 1e-5 if running_dtype == torch.float32 else TOL[running_dtype]
    rm_ref = (1 - momentum) * rm0.double() + momentum * m_ref
    rv_ref = (1 - momentum) * rv0.double() + momentum * v_ref * (n / max(n - 1, 1))
    assert rm.dtype == running_dtype and rv.dtype == running_dtype
    torch.testing.assert_close(rm.double(), rm_ref, rtol=rtol, atol=rtol * spread)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=rtol, atol=rtol)
    return mean, invstd


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RESNET50 + ODD, ids=ids)
def test_bn_stats_vs_float64(shape, dtype, poison):
    check_stats(rand_z(shape, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 64, 5, 5), (2, 12, 3, 3)], ids=ids)
def test_bn_stats_misaligned_and_half_running_stats(shape, dtype, poison):
    z = rand_z(shape, dtype, misalign=True)
    assert z.data_ptr() % 16 != 0
    check_stats(z)
    check_stats(rand_z(shape, dtype), momentum=0.3, running_dtype=torch.float16)
    check_stats(rand_z(shape, dtype), running_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_vs_batchnorm2d(dtype, momentum):
    c = 96
    bn = nn.BatchNorm2d(c, momentum=momentum).cuda()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    bn.train()
    for step in range(3):
        z = rand_z((8, c, 9, 7), dtype)
        with torch.no_grad():
            bn(z.float())
        factor = 1.0 / float(bn.num_batches_tracked) if momentum is None else momentum
        ci.bn_stats(z, rm, rv, factor, bn.eps)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def ref_apply(z, mean, invstd, w, b, res, relu):
    scale = invstd.double() * (w.double() if w is not None else 1.0)
    y = (z.double() - chan(mean)) * chan(scale)
    if b is not None:
        y = y + chan(b)
    if res is not None:
        y = y + res.double()
    return torch.relu(y) if relu else y


def check_apply(z, relu, with_res, affine, param_dtype=torch.float32, misalign=False):
    c = z.shape[1]
    dev = z.device
    mean = torch.randn(c, device=dev) * 2
    invstd = torch.rand(c, device=dev) + 0.3
    w = (torch.rand(c, device=dev) + 0.5).to(param_dtype) if affine else None
    b = torch.randn(c, device=dev).to(param_dtype) if affine else None
    res = rand_z(tuple(z.shape), z.dtype, misalign=misalign) if with_res else None
    y, mask = ci.bn_apply(z, mean, invstd, w, b, res, relu, True)
    assert y.shape == z.shape and y.dtype == z.dtype and y.is_contiguous(memory_format=CL)
    ref = ref_apply(z, mean, invstd, w, b, res, relu)
    tol = TOL[z.dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    if relu:
        assert mask.dtype == torch.uint8 and mask.numel() == (z.numel() + 7) // 8
        assert torch.equal(mask, pack_relu_mask(y)), "mask bits differ from y > 0"
    else:
        assert mask.numel() == 0
    return y


@pytest.mark.gpu
@pytest.mark.parametrize("relu,with_res,affine", [(True, False, True), (True, True, True),
                                                  (False, False, True), (False, True, False)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RESNET50 + ODD, ids=ids)
def test_bn_apply_vs_float64(shape, dtype, relu, with_res, affine, poison):
    check_apply(rand_z(shape, dtype), relu, with_res, affine)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 64, 5, 5), (3, 5, 7, 9)], ids=ids)
def test_bn_apply_misaligned_and_half_params(shape, dtype, poison):
    z = rand_z(shape, dtype, misalign=True)
    check_apply(z, True, True, True, misalign=True)
    check_apply(rand_z(shape, dtype), True, True, True, misalign=True)  # only the residual misaligned
    check_apply(rand_z(shape, dtype), True, False, True, param_dtype=torch.float16)


def ref_backward(g, z, mask, mean, invstd, w, training, relu):
    gd = g.double()
    if relu:
        gd = gd.masked_fill(~unpack_relu_mask(mask, z), 0.0)
    xhat = (z.double() - chan(mean)) * chan(invstd)
    n = z.numel() // z.shape[1]
    sum_g = gd.sum(dim=(0, 2, 3))
    sum_gx = (gd * xhat).sum(dim=(0, 2, 3))
    scale = invstd.double() * (w.double() if w is not None else 1.0)
    if training:
        dz = (gd - chan(sum_g / n) - xhat * chan(sum_gx / n)) * chan(scale)
    else:
        dz = gd * chan(scale)
    abs_g = gd.abs().sum(dim=(0, 2, 3))
    abs_gx = (gd * xhat).abs().sum(dim=(0, 2, 3))
    return dz, sum_gx, sum_g, gd, abs_gx, abs_g


def check_backward(z, g, training, relu, need_dres, affine):
    c = z.shape[1]
    dev = z.device
    m_ref, v_ref = ref_stats(z)
    mean = m_ref.float() if training else torch.randn(c, device=dev)
    invstd = torch.rsqrt(v_ref + EPS).float() if training else torch.rand(c, device=dev) + 0.3
    w = torch.rand(c, device=dev) + 0.5 if affine else None
    nbytes = (z.numel() + 7) // 8
    mask = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev) if relu else \
        torch.empty(0, dtype=torch.uint8, device=dev)
    dz, dgamma, dbeta, dres = ci.bn_backward(g, z, mask, mean, invstd, w, training, relu, need_dres)
    dz_ref, dg_ref, db_ref, g_ref, abs_gx, abs_g = ref_backward(g, z, mask, mean, invstd, w, training, relu)
    tol = TOL[z.dtype]
    assert dz.dtype == z.dtype and dz.is_contiguous(memory_format=CL)
    torch.testing.assert_close(dz.double(), dz_ref, rtol=tol, atol=tol * dz_ref.abs().max().item())
    assert dgamma.dtype == dbeta.dtype == torch.float32
    # fp32 sums: error bounded by a small multiple of eps * sum(|terms|)
    assert ((dgamma.double() - dg_ref).abs() <= 1e-5 * abs_gx + 1e-6).all(), "dgamma"
    assert ((dbeta.double() - db_ref).abs() <= 1e-5 * abs_g + 1e-6).all(), "dbeta"
    if need_dres:
        assert dres.dtype == z.dtype and dres.is_contiguous(memory_format=CL)
        assert torch.equal(dres, g_ref.to(z.dtype)), "dres must be g, masked"
    else:
        assert dres.numel() == 0
    return dz, dgamma, dbeta


@pytest.mark.gpu
@pytest.mark.parametrize("training,relu,need_dres,affine", [(True, True, True, True), (True, False, False, True),
                                                            (False, True, False, True), (True, True, False, False),
                                                            (False, False, True, False)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RESNET50 + ODD, ids=ids)
def test_bn_backward_vs_float64(shape, dtype, training, relu, need_dres, affine, poison):
    z = rand_z(shape, dtype)
    g = rand_z(shape, dtype)
    check_backward(z, g, training, relu, need_dres, affine)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 64, 5, 5), (3, 5, 7, 9)], ids=ids)
def test_bn_backward_misaligned(shape, dtype, poison):
    z, g = rand_z(shape, dtype, misalign=True), rand_z(shape, dtype)
    check_backward(z, g, True, True, True, True)
    z, g = rand_z(shape, dtype), rand_z(shape, dtype, misalign=True)
    check_backward(z, g, True, True, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 256, 56, 56), (32, 2048, 7, 7), (3, 5, 7, 9)], ids=ids)
def test_two_runs_bitwise_equal(shape, dtype):
    z, g = rand_z(shape, dtype), rand_z(shape, dtype)
    c = shape[1]
    w = torch.rand(c, device="cuda") + 0.5
    mask = torch.randint(0, 256, ((z.numel() + 7) // 8,), dtype=torch.uint8, device="cuda")
    outs = []
    for _ in range(2):
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        mean, invstd = ci.bn_stats(z, rm, rv, 0.1, EPS)
        y, m = ci.bn_apply(z, mean, invstd, w, w, z, True, True)
        outs.append((mean, invstd, rm, rv, y, m) + ci.bn_backward(g, z, mask, mean, invstd, w, True, True, True))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_graph_replay():
    """The reduction counters are reset by the kernels: replays of a captured graph stay correct."""
    shape = (8, 64, 10, 10)
    z = rand_z(shape, torch.bfloat16)
    g = rand_z(shape, torch.bfloat16)
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph
        m0, i0 = ci.bn_stats(z, rm, rv, 0.1, EPS)
        y0, k0 = ci.bn_apply(z, m0, i0, None, None, None, True, True)
        ci.bn_backward(g, z, k0, m0, i0, None, True, True, False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mean, invstd = torch.ops.fastres.bn_stats(z, None, None, 0.1, EPS)
        y, mask = torch.ops.fastres.bn_apply(z, mean, invstd, None, None, None, True, True)
        dz, dg, db, _ = torch.ops.fastres.bn_backward(g, z, mask, mean, invstd, None, True, True, False)
    for _ in range(3):
        z.copy_(rand_z(shape, torch.bfloat16))
        g.copy_(rand_z(shape, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        m_ref, i_ref = ci.bn_stats(z, None, None, 0.1, EPS)
        y_ref, mask_ref = ci.bn_apply(z, m_ref, i_ref, None, None, None, True, True)
        ref = ci.bn_backward(g, z, mask_ref, m_ref, i_ref, None, True, True, False)
        for a, b in zip((mean, invstd, y, mask, dz, dg, db), (m_ref, i_ref, y_ref, mask_ref) + ref[:3]):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_opcheck():
    z = rand_z((4, 24, 5, 5), torch.float32)
    c = z.shape[1]
    mean, invstd = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
    w = torch.rand(c, device="cuda")
    mask = torch.randint(0, 256, ((z.numel() + 7) // 8,), dtype=torch.uint8, device="cuda")
    ops = torch.ops.fastres
    torch.library.opcheck(ops.bn_stats.default, (z, torch.zeros(c, device="cuda"),
                                                 torch.ones(c, device="cuda"), 0.1, EPS))
    torch.library.opcheck(ops.bn_stats.default, (z, None, None, 0.1, EPS))
    torch.library.opcheck(ops.bn_apply.default, (z, mean, invstd, w, w, z.clone(), True, True))
    torch.library.opcheck(ops.bn_apply.default, (z, mean, invstd, None, None, None, False, False))
    torch.library.opcheck(ops.bn_backward.default, (z.clone(), z, mask, mean, invstd, w, True, True, True))
    torch.library.opcheck(ops.bn_backward.default, (z.clone(), z, mask, mean, invstd, None, False, False,
                                                    False))


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    def f(z, w, b):
        mean, invstd = torch.ops.fastres.bn_stats(z, None, None, 0.1, EPS)
        y, mask = torch.ops.fastres.bn_apply(z, mean, invstd, w, b, None, True, True)
        return y * 2, mask

    z = rand_z((4, 32, 6, 6), torch.float16)
    w, b = torch.rand(32, device="cuda"), torch.randn(32, device="cuda")
    got = torch.compile(f, fullgraph=True)(z, w, b)
    want = f(z, w, b)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------------------
# GPU: the whole op, backend "cuda" against the torch backend and float64
# ------------------------------------------------------------------------------------------------

CONV_CASES = [  # (N, Cin, H, W, Cout, k, stride, padding)
    (8, 64, 14, 14, 64, 3, 1, 1),
    (4, 32, 9, 9, 128, 1, 2, 0),
    (3, 16, 7, 6, 13, 3, 1, 1),
    (2, 3, 11, 11, 20, 7, 2, 3),
    (1, 16, 7, 7, 24, 3, 1, 1),
    (1, 8, 1, 1, 16, 1, 1, 0),
]


@pytest.fixture
def no_tf32():
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def _leaves(dtype, x, w, gamma, beta, res):
    """Fresh leaf tensors: x, w (and the residual) in dtype, gamma and beta in float32 (float64 for the
    reference)."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = [x.detach().to(dtype), w.detach().to(dtype), gamma.detach().to(pdtype), beta.detach().to(pdtype)]
    if res is not None:
        out.append(res.detach().to(dtype))
    return [t.requires_grad_() for t in out]


def _run(name, dtype, x, w, gamma, beta, rm, rv, res, s, p, training, relu, gy):
    """y, grads and running stats of conv_bn_act on backend `name` with inputs in dtype."""
    from fastres.ops import conv_bn_act

    leaves = _leaves(dtype, x, w, gamma, beta, res)
    r_ = leaves[4] if res is not None else None
    rm_, rv_ = rm.clone(), rv.clone()
    with backend.use_backend(name):
        y = conv_bn_act(leaves[0], leaves[1], None, leaves[2], leaves[3], rm_, rv_, r_, stride=s, padding=p,
                        training=training, momentum=0.1, eps=EPS, relu=relu)
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return y, grads, rm_, rv_


def _float64_reference(x, w, gamma, beta, rm, rv, res, s, p, training, relu, gy):
    """The same, from the definition, in float64."""
    leaves = _leaves(torch.float64, x, w, gamma, beta, res)
    x_, w_, g_, b_ = leaves[:4]
    z = torch.nn.functional.conv2d(x_, w_, None, s, p)
    rm_, rv_ = rm.double().clone(), rv.double().clone()
    if training:
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
        n = z.numel() // z.shape[1]
        rm_ = 0.9 * rm_ + 0.1 * mean.detach()
        rv_ = 0.9 * rv_ + 0.1 * var.detach() * (n / (n - 1))
    else:
        mean, var = rm.double(), rv.double()
    y = (z - chan(mean)) * chan(torch.rsqrt(var + EPS)) * chan(g_) + chan(b_)
    if res is not None:
        y = y + leaves[4]
    if relu:
        y = torch.relu(y)
    grads = torch.autograd.grad(y, leaves, gy)
    return y, grads, rm_, rv_


@pytest.mark.gpu
@pytest.mark.parametrize("relu,with_res", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv_bn_act_cuda_vs_torch_backend(case, dtype, channels_last, training, relu, with_res, no_tf32,
                                          poison):
    n, cin, h, w_, cout, k, s, p = case
    if training and n * ((h + 2 * p - k) // s + 1) * ((w_ + 2 * p - k) // s + 1) == 1:
        pytest.skip("training needs more than one value per channel")
    dev = "cuda"
    x = torch.randn(n, cin, h, w_, device=dev).to(dtype).float()
    if channels_last:
        x = x.contiguous(memory_format=CL)
    w = (torch.randn(cout, cin, k, k, device=dev) / math.sqrt(cin * k * k)).to(dtype).float()
    gamma, beta = torch.rand(cout, device=dev) + 0.5, torch.randn(cout, device=dev)
    rm, rv = torch.randn(cout, device=dev) * 0.1, torch.rand(cout, device=dev) + 0.5
    ho, wo = (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1
    res = torch.randn(n, cout, ho, wo, device=dev).to(dtype).float() if with_res else None
    if res is not None and channels_last:
        res = res.contiguous(memory_format=CL)
    gy = torch.randn(n, cout, ho, wo, device=dev).to(dtype).double()

    before = backend.calls[("conv_bn_act", "forward", "cuda")]
    y_c, gr_c, rm_c, rv_c = _run("cuda", dtype, x, w, gamma, beta, rm, rv, res, s, p, training, relu, gy)
    assert backend.calls[("conv_bn_act", "forward", "cuda")] == before + 1, "the cuda backend did not run"
    y_t, gr_t, rm_t, rv_t = _run("torch", dtype, x, w, gamma, beta, rm, rv, res, s, p, training, relu, gy)
    y_d, gr_d, rm_d, rv_d = _float64_reference(x, w, gamma, beta, rm, rv, res, s, p, training, relu, gy)

    fmt = CL if channels_last and not x.is_contiguous() else torch.contiguous_format
    assert y_c.dtype == dtype and y_c.is_contiguous(memory_format=fmt)
    floor = TOL[dtype]

    def close(name, got, torch_path, ref):
        """The cuda backend's error against float64 is at most about twice the torch backend's, or
        within the dtype's tolerance relative to the largest reference value."""
        err_c = (got.double() - ref.double()).abs().max().item()
        err_t = (torch_path.double() - ref.double()).abs().max().item()
        scale = ref.double().abs().max().item() + 1e-12
        assert err_c <= 2 * err_t + floor * scale, f"{name}: cuda err {err_c:.3g}, torch err {err_t:.3g}"
        assert got.shape == ref.shape and got.dtype == torch_path.dtype, name

    close("y", y_c, y_t, y_d)
    close("running_mean", rm_c, rm_t, rm_d)
    close("running_var", rv_c, rv_t, rv_d)
    names = ["dx", "dW", "dgamma", "dbeta", "dres"]
    for name, a, b, r in zip(names, gr_c, gr_t, gr_d):
        close(name, a, b, r)
    assert gr_c[0].is_contiguous(memory_format=fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_bn_act_op_mask_layout(dtype, channels_last, poison):
    """The op's packed mask follows pack_relu_mask(y) (memory order of y) in both layouts."""
    x = torch.randn(3, 16, 9, 7, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    w = torch.randn(12, 16, 3, 3, device="cuda", dtype=dtype) * 0.1
    c = 12
    args = (x, w, None, torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda"),
            torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"), None, [1, 1], [1, 1], [1, 1], 1,
            True, 0.1, EPS, True, True)
    with backend.use_backend("cuda"):
        y, z, mean, invstd, mask = torch.ops.fastres.conv_bn_act(*args)
    assert torch.equal(mask, pack_relu_mask(y))
    assert z.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


# ------------------------------------------------------------------------------------------------
# GPU: compute-sanitizer
# ------------------------------------------------------------------------------------------------

SANITIZER_SCRIPT = r"""
import torch
from fastres.backends import cuda as ci
torch.manual_seed(0)
CL = torch.channels_last
def z_of(shape, dtype, misalign=False):
    n, c, h, w = shape
    base = torch.randn(n * h * w * c + misalign, device="cuda").to(dtype)
    return base[int(misalign):].view(n, h, w, c).permute(0, 3, 1, 2)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape in [(2, 64, 5, 5), (3, 12, 3, 5), (2, 5, 3, 3), (1, 8, 1, 1), (3, 40, 7, 1), (2, 2056, 2, 2)]:
        for misalign in (False, True):
            c = shape[1]
            z = z_of(shape, dtype, misalign)
            g = z_of(shape, dtype, misalign)
            rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            w, b = torch.rand(c, device="cuda"), torch.randn(c, device="cuda")
            mean, invstd = ci.bn_stats(z, rm, rv, 0.1, 1e-5)
            for relu, res in ((True, z_of(shape, dtype, misalign)), (False, None)):
                y, mask = ci.bn_apply(z, mean, invstd, w, b, res, relu, True)
                for training in (True, False):
                    ci.bn_backward(g, z, mask, mean, invstd, w, training, relu, True)
                    ci.bn_backward(g, z, mask, mean, invstd, None, training, relu, False)
torch.cuda.synchronize()
print("sanitizer script done")
"""


def _sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    homes += sorted((os.path.join("/usr/local", d) for d in os.listdir("/usr/local") if d.startswith("cuda-")),
                    reverse=True)
    for home in homes:
        path = os.path.join(home, "bin", "compute-sanitizer")
        if home and os.path.isfile(path):
            return path
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool, tmp_path):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)")
    script = tmp_path / "sanitize_bn.py"
    script.write_text(SANITIZER_SCRIPT)
    # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    # Only fastres's kernels (namespace fastres, in both mangled and demangled names) are checked.
    cmd = [exe, "--tool", tool, "--error-exitcode", "1", "--kernel-name", "kns=fastres", sys.executable,
           str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    text = out.stdout + out.stderr
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0 and "sanitizer script done" in out.stdout, log
    assert re.search(r"ERROR SUMMARY: [1-9]|\(([1-9]\d*) errors", text) is None, log
