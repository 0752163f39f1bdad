"""fastres._C's ops without running a kernel: the three ops are registered with their schemas and a
fake (meta) implementation each, the fakes give the right shapes / dtypes / layouts, CPU tensors and
bad input raise errors that name what was expected, the poison switch reaches the extension, and the
C++ library coexists with the Python custom ops of the fastres namespace in either import order.
The kernels themselves: test_ext_kernels.py (GPU)."""
import math
import subprocess
import sys

import pytest
import torch

from fastres import _ext
from fastres.kernels.alloc import poisoned

BUILT, WHY = _ext.status()
pytestmark = pytest.mark.skipif(not BUILT, reason=f"fastres._C is not built: {WHY}")
if BUILT:
    from fastres.backends import cuda as ci

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
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
        (lambda: ops.bn_stats(torch.empty(2, c, 0, 3).contiguous(memory_format=CL), None, None, 0.1, EPS),
         r"at least one value per channel"),
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
