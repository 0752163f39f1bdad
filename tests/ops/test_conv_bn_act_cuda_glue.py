"""The cuda backend's Python glue (layouts, ReLU-mask re-packing, eval mode, gradient plumbing),
checked on a CPU: its three C++ kernels are stood in by the Triton kernels of the same names and
semantics (kernels/batchnorm.py, through the interpreter), and the result must equal the torch
backend. The C++ kernels themselves are tested on a GPU (test_conv_bn_act_cuda.py)."""
import pytest
import torch

from fastres import _ext, backend
from fastres.layout import memory_format_of
from fastres.ops import reference

pytestmark = [
    pytest.mark.skipif(not _ext.status()[0], reason=f"fastres._C not built: {_ext.status()[1]}"),
    pytest.mark.skipif(not backend.interpreter_active() and not torch.cuda.is_available(),
                       reason="needs the Triton interpreter (TRITON_INTERPRET=1) for the stand-in kernels"),
]


@pytest.fixture
def cuda_impl(monkeypatch):
    from fastres.backends import cuda as cuda_impl
    from fastres.kernels import batchnorm

    for name in ("bn_stats", "bn_apply", "bn_backward"):
        monkeypatch.setattr(cuda_impl, name, getattr(batchnorm, name))
    return cuda_impl


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)])
def test_cuda_glue_matches_torch_backend(cuda_impl, channels_last, training, relu, residual):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(6, 5, 3, 3) * 0.3, torch.randn(6)
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    res = torch.randn(2, 6, 4, 3) if residual else None
    conv = ([2, 2], [1, 1], [1, 1], 1)
    rm0, rv0 = torch.randn(6), torch.rand(6) + 0.5
    stats = [(rm0.clone(), rv0.clone()) for _ in range(2)]
    outs = []
    for impl, (rm, rv) in ((cuda_impl, stats[0]), (reference, stats[1])):
        fwd = impl.conv_bn_act_forward(x, w, b, gamma, beta, rm, rv, res, *conv, training, 0.1, 1e-5,
                                       relu, True)
        y, z, mean, invstd, mask = fwd
        torch.manual_seed(1)
        g = torch.randn(y.shape).contiguous(memory_format=memory_format_of(x))
        grads = impl.conv_bn_act_backward(g, x, w, b, z, mask, mean, invstd, gamma, *conv, training, relu,
                                          [True, True, True, True, True, residual])
        outs.append((fwd, grads, rm.clone(), rv.clone()))
    (fa, ga, rma, rva), (fb, gb, rmb, rvb) = outs
    fmt = memory_format_of(x)
    for name, a, b_ in zip(["y", "z", "mean", "invstd", "mask"], fa, fb):
        assert a.shape == b_.shape and a.dtype == b_.dtype, name
        if a.dim() == 4:
            assert a.is_contiguous(memory_format=fmt), name
        if name == "mask":
            assert torch.equal(a, b_)
        else:
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name, a, b_ in zip(["dx", "dW", "db", "dgamma", "dbeta", "dres"], ga, gb):
        assert a.shape == b_.shape and a.dtype == b_.dtype, name
        if a.dim() == 4 and name != "dW":
            assert a.is_contiguous(memory_format=fmt), name
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(rma, rmb), torch.testing.assert_close(rva, rvb)
