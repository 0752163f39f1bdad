"""fastres._C's kernels on a GPU, op by op, against float64 references with outputs poisoned: ResNet-50's
BatchNorm shapes and odd ones (C not a multiple of 8, ragged rows, batch 1, one channel, misaligned
pointers), running statistics against nn.BatchNorm2d, the grid counters shared by the calls of a
stream, bitwise reproducibility, CUDA graph replay, opcheck and torch.compile. The whole op on the
cuda backend: tests/backends/. Tolerances: tests/numerics.py's tol(dtype) (these kernels have no
same-dtype PyTorch twin)."""
import pytest
import torch
import torch.nn as nn
from numerics import tol

from fastres import _ext
from fastres.layout import pack_relu_mask, unpack_relu_mask

BUILT, WHY = _ext.status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not BUILT, reason=f"fastres._C is not built: {WHY}")]
if BUILT:
    from fastres.backends import cuda as ci

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5

# (N, C, H, W). ResNet-50's BatchNorm inputs at batch 32, and shapes that take the scalar paths
# (C % 8 != 0), ragged row counts, one row, one channel.
RESNET50 = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 128, 28, 28), (32, 512, 28, 28),
            (32, 1024, 14, 14), (32, 2048, 7, 7)]
ODD = [(3, 5, 7, 9), (2, 12, 5, 5), (4, 20, 3, 3), (5, 64, 13, 11), (1, 24, 3, 3), (2, 3, 1, 1),
       (7, 1, 4, 5), (2, 40, 1, 33), (1, 8, 1, 1), (3, 2056, 3, 3)]


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
    rtol = 1e-5 if running_dtype == torch.float32 else tol(running_dtype)
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
    rel = tol(z.dtype)
    torch.testing.assert_close(y.double(), ref, rtol=rel, atol=rel)
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
    rel = tol(z.dtype)
    assert dz.dtype == z.dtype and dz.is_contiguous(memory_format=CL)
    torch.testing.assert_close(dz.double(), dz_ref, rtol=rel, atol=rel * dz_ref.abs().max().item())
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



def test_grid_counters_shared_by_the_calls_of_a_stream(poison):
    """The reductions' grid counters are kept per device and stream, zeroed once and reset by the last
    block of each channel column (csrc/batchnorm.cpp, grid_counters): calls whose grids grow and
    shrink, bn_stats and bn_backward taking turns, and two side streams at once, all give the float64
    results."""
    for shape in [(2, 8, 3, 3), (32, 2048, 7, 7), (3, 5, 7, 9), (32, 256, 28, 28), (2, 8, 3, 3)]:
        z = rand_z(shape, torch.float32)
        check_stats(z)
        check_backward(z, rand_z(shape, torch.float32), True, True, True, True)
    shapes = [(32, 2048, 7, 7), (16, 1024, 14, 14)]
    zs = [rand_z(shape, torch.bfloat16) for shape in shapes]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    outs = []
    for _ in range(3):
        for s, z in zip(streams, zs):
            with torch.cuda.stream(s):
                outs.append((z, ci.bn_stats(z, None, None, 0.1, EPS)))
    torch.cuda.synchronize()
    for z, (mean, invstd) in outs:
        m_ref, v_ref = ref_stats(z)
        torch.testing.assert_close(mean.double(), m_ref, rtol=1e-5, atol=1e-5 * (v_ref.sqrt().max().item() + 1e-3))
        torch.testing.assert_close(invstd.double(), torch.rsqrt(v_ref + EPS), rtol=1e-5, atol=0)
