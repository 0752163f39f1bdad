"""bn_act (BatchNorm + residual + ReLU, no conv) on each fused backend against PyTorch's own path and
float64, as tests/backends/test_fused_backends.py does for conv_bn_act: the same inputs run on the fused
backend in the test dtype, on the torch backend in that dtype and on the torch backend in float64; y,
the running statistics and every gradient must pass the house rule. Kernel outputs are poisoned."""
import pytest
import torch
from fused_params import BACKENDS, DEVICE, case_seed, grad_leaf, skip_unless_dtype_runs
from numerics import assert_as_good

from fastres import backend
from fastres.ops import bn_act

SMALL = [(2, 5, 6, 5), (1, 17, 4, 3), (3, 8, 1, 2)]      # (N, C, H, W): odd channels, batch 1, 1-pixel rows
GPU = [(32, 64, 56, 56), (32, 2048, 7, 7), (5, 24, 9, 9), (1, 256, 14, 14)]
GRADS = ["dx", "dgamma", "dbeta", "dres"]


def _inputs(shape, residual, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape

    def data(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(dtype).float().to(DEVICE)

    return dict(x=data(n, c, h, w, scale=2.0, shift=0.5), res=data(n, c, h, w) if residual else None,
                gamma=(torch.rand(c, generator=g) + 0.5).to(DEVICE), beta=torch.randn(c, generator=g).to(DEVICE),
                rm=(torch.randn(c, generator=g) * 0.1).to(DEVICE), rv=(torch.rand(c, generator=g) + 0.5).to(DEVICE),
                gy=data(n, c, h, w))


def _run(name, inp, dtype, channels_last, training, relu):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, res = grad_leaf(inp["x"], dtype, fmt), grad_leaf(inp["res"], dtype, fmt)
    gamma, beta = grad_leaf(inp["gamma"], pdtype), grad_leaf(inp["beta"], pdtype)
    rm, rv = inp["rm"].to(pdtype, copy=True), inp["rv"].to(pdtype, copy=True)
    before = backend.calls[("bn_act", "forward", name)]
    with backend.use_backend(name):
        y = bn_act(x, gamma, beta, rm, rv, res, training=training, momentum=0.1, eps=1e-5, relu=relu)
        leaves = [t for t in (x, gamma, beta, res) if t is not None]
        grads = iter(torch.autograd.grad(y, leaves, inp["gy"].to(dtype).contiguous(memory_format=fmt)))
    assert backend.calls[("bn_act", "forward", name)] == before + 1, f"the {name} backend did not run"
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    out = dict(y=y.detach(), running_mean=rm, running_var=rv)
    for key, t in zip(GRADS, (x, gamma, beta, res)):
        if t is not None:
            out[key] = next(grads)
            assert out[key].dtype == t.dtype, key
    assert out["dx"].is_contiguous(memory_format=fmt)
    return out


def compare(name, inp, dtype, channels_last, training, relu):
    oracle = _run("torch", inp, torch.float64, channels_last, training, relu)
    eager = _run("torch", inp, dtype, channels_last, training, relu)
    got = _run(name, inp, dtype, channels_last, training, relu)
    assert set(got) == set(oracle) == set(eager)
    for key in got:
        assert_as_good(got[key], eager[key], oracle[key], name=f"{name} bn_act {key} ({dtype}, training={training})")


@pytest.mark.parametrize("shape", SMALL, ids=str)
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_small_fp32_vs_torch_and_float64(name, shape, relu, residual, channels_last, training, poison):
    inp = _inputs(shape, residual, case_seed(shape, relu, residual, channels_last, training), torch.float32)
    compare(name, inp, torch.float32, channels_last, training, relu)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_small_fp16_vs_torch_and_float64(name, training, poison):
    shape = SMALL[0]
    compare(name, _inputs(shape, True, case_seed(shape, training), torch.float16), torch.float16, True, training, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", GPU, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_gpu_shapes(name, shape, training, channels_last, dtype, poison):
    skip_unless_dtype_runs(dtype)
    inp = _inputs(shape, True, case_seed(shape, training, channels_last, dtype), dtype)
    compare(name, inp, dtype, channels_last, training, True)


@pytest.mark.parametrize("name", BACKENDS)
def test_uncovered_dtype_runs_torch_and_is_counted(name):
    x = torch.randn(2, 3, 4, 4, device=DEVICE, dtype=torch.float64)
    rm, rv = torch.zeros(3, device=DEVICE, dtype=torch.float64), torch.ones(3, device=DEVICE, dtype=torch.float64)
    backend.calls.clear()
    with backend.use_backend(name):
        y = bn_act(x, None, None, rm, rv, relu=True)
    assert backend.calls[("bn_act", "forward", f"{name}->torch")] == 1
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(
        x, torch.zeros_like(rm), torch.ones_like(rv), training=True)))
