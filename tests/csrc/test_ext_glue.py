"""The cuda backend's Python glue (fastres/backends/cuda.py: layouts, ReLU-mask re-packing, eval mode,
gradient plumbing), checked on a CPU: its three C++ kernels are stood in by the Triton kernels of the
same names and semantics (kernels/batchnorm.py, through the interpreter), and the result must equal
the oracle (fastres/ops/reference.py) within fp32 rounding. The C++ kernels themselves are tested on a
GPU (test_ext_kernels.py)."""
import pytest
import torch
from numerics import assert_as_good

from fastres import _ext, backend
from fastres.layout import memory_format_of, pack_relu_mask
from fastres.ops import reference

pytestmark = [
    pytest.mark.skipif(not _ext.status()[0], reason=f"fastres._C not built: {_ext.status()[1]}"),
    pytest.mark.skipif(not backend.interpreter_active(),
                       reason="runs the stand-in kernels on CPU tensors through the Triton interpreter "
                              "(TRITON_INTERPRET=1, set without a GPU); on a GPU the C++ kernels run themselves"),
]


@pytest.fixture
def cuda_impl(monkeypatch):
    from fastres.backends import cuda as cuda_impl
    from fastres.kernels import batchnorm

    for name in ("bn_stats", "bn_apply", "bn_backward"):
        monkeypatch.setattr(cuda_impl, name, getattr(batchnorm, name))
    return cuda_impl


def _run(impl, x, w, b, gamma, beta, rm, rv, res, conv, training, relu, residual):
    fwd = impl.conv_bn_act_forward(x, w, b, gamma, beta, rm, rv, res, *conv, training, 0.1, 1e-5, relu, True)
    y, z, mean, invstd, mask = fwd
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    g = g.contiguous(memory_format=memory_format_of(x))
    grads = impl.conv_bn_act_backward(g, x, w, b, z, mask, mean, invstd, gamma, *conv, training, relu,
                                      [True, True, True, True, True, residual])
    return fwd, grads, rm, rv


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)])
def test_cuda_glue_matches_torch_backend(cuda_impl, channels_last, training, relu, residual):
    """The glue in fp32 against the oracle in fp32 (PyTorch's own path) and in float64, by the house
    rule; formats, dtypes and the mask exactly."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 6, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(6, 5, 3, 3, generator=gen) * 0.3, torch.randn(6, generator=gen)
    gamma, beta = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    res = torch.randn(2, 6, 4, 3, generator=gen) if residual else None
    rm0, rv0 = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.5
    conv = ([2, 2], [1, 1], [1, 1], 1)
    args = (x, w, b, gamma, beta, rm0, rv0, res)
    got = _run(cuda_impl, *(t.clone() if t is not None else None for t in args), conv, training, relu, residual)
    ref = _run(reference, *(t.clone() if t is not None else None for t in args), conv, training, relu, residual)
    oracle = _run(reference, *(t.double() if t is not None else None for t in args), conv, training, relu,
                  residual)
    fmt = memory_format_of(x)
    fwd_names = ["y", "z", "mean", "invstd", "mask"]
    grad_names = ["dx", "dW", "db", "dgamma", "dbeta", "dres"]
    for names, a_s, r_s, o_s in ((fwd_names, got[0], ref[0], oracle[0]), (grad_names, got[1], ref[1], oracle[1]),
                                 (["running_mean", "running_var"], got[2:], ref[2:], oracle[2:])):
        for name, a, r, o in zip(names, a_s, r_s, o_s):
            assert a.shape == r.shape and a.dtype == r.dtype, name
            if a.dim() == 4 and name != "dW":
                assert a.is_contiguous(memory_format=fmt), name
            if name == "mask":
                assert torch.equal(a, r)
            elif name == "db" and training:
                # BatchNorm cancels the conv bias: db is 0 up to rounding, which no ratio can judge.
                assert a.abs().max().item() <= 1e-5 * o_s[0].abs().sum().item(), "db"
            else:
                assert_as_good(a, r, o, name=f"{name} (training={training}, relu={relu})")


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 16, 1, 1), (1, 1, 5, 3), (2, 8, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mask_repacked_from_nchw_to_nhwc_order(shape):
    from fastres.backends import cuda as ci

    y = torch.randn(shape)
    m = ci.mask_nchw_to_nhwc(pack_relu_mask(y), shape)
    assert torch.equal(m, pack_relu_mask(y.contiguous(memory_format=torch.channels_last)))

