"""conv_bn_act on each fused backend ("triton", "cuda") against PyTorch's own path and float64.

Each comparison runs the same inputs (data rounded to the test dtype first, so every run sees the
same values) three times: the fused backend in the test dtype, the torch backend in the same dtype
(PyTorch's own path), and the torch backend in float64 (the oracle: fastres/ops/reference.py's math).
Every output - y, the running statistics, every gradient - must pass the house rule of
tests/numerics.py. Kernel outputs are poisoned (NaN) before every launch; TF32 is off on a GPU, so
PyTorch's fp32 path (and the kernels' fp32 products, which follow cudnn.allow_tf32) are fp32.

The small cases run wherever the backend runs (triton: CPU through the interpreter, fp32 and fp16);
ResNet-50 layer shapes and the larger conv cases need a GPU. Which backend runs where: fused_params.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from fused_params import BACKENDS, DEVICE, case_seed, grad_leaf
from numerics import ULPS, assert_as_good, max_error

from fastres import backend
from fastres.ops import conv_bn_act

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRADS = ["dx", "dW", "db", "dgamma", "dbeta", "dres"]

SMALL = [  # (N, Cin, H, W, Cout, k, stride, padding, conv bias): tiny, for the interpreter
    (2, 3, 6, 5, 5, 3, 1, 1, False),
    (1, 5, 7, 7, 17, 1, 2, 0, True),   # batch 1, odd channel counts, strided 1x1
    (2, 4, 5, 5, 3, 3, 2, 1, True),
]

CONV = [  # GPU: channel counts on and off the vector paths, ragged rows, batch 1, a 7x7 stem
    (8, 64, 14, 14, 64, 3, 1, 1, False),
    (4, 32, 9, 9, 128, 1, 2, 0, False),
    (3, 16, 7, 6, 13, 3, 1, 1, False),
    (2, 3, 11, 11, 20, 7, 2, 3, False),
    (1, 16, 7, 7, 24, 3, 1, 1, False),
    (1, 8, 1, 1, 16, 1, 1, 0, False),
]

R50 = [  # GPU: ResNet-50 layer shapes, batch 32
    (32, 64, 56, 56, 64, 3, 1, 1, False),     # layer1 3x3
    (32, 256, 56, 56, 64, 1, 1, 0, False),    # layer1 1x1 reduce
    (32, 128, 56, 56, 128, 3, 2, 1, False),   # layer2 first 3x3, stride 2
    (32, 1024, 14, 14, 256, 1, 1, 0, False),  # layer3 1x1 reduce
    (32, 512, 7, 7, 2048, 1, 1, 0, False),    # layer4 1x1 expand (+ residual)
]


def case_id(case):
    return "-".join(map(str, case))


@pytest.fixture(autouse=True)
def _no_tf32():
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def _out_hw(case):
    n, cin, h, w, cout, k, s, p, _ = case
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def _inputs(case, residual, seed, dtype, device=DEVICE):
    """Fresh random inputs for `case`; data (x, W, b, residual, dL/dy) rounded to dtype, then kept in
    float32 so that each run casts the very same values."""
    n, cin, h, w, cout, k, s, p, has_bias = case
    g = torch.Generator().manual_seed(seed)
    ho, wo = _out_hw(case)

    def data(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).float().to(device)

    return dict(
        x=data(n, cin, h, w), w=data(cout, cin, k, k, scale=1 / math.sqrt(cin * k * k)),
        b=data(cout) if has_bias else None,
        gamma=(torch.rand(cout, generator=g) + 0.5).to(device), beta=torch.randn(cout, generator=g).to(device),
        res=data(n, cout, ho, wo) if residual else None,
        rm=(torch.randn(cout, generator=g) * 0.1).to(device), rv=(torch.rand(cout, generator=g) + 0.5).to(device),
        gy=data(n, cout, ho, wo), stride=s, padding=p)


def _run(name, inp, dtype, channels_last, training, relu):
    """Forward + backward of the op on backend `name` with data in `dtype` (BatchNorm parameters and
    running statistics in float32, float64 for a float64 run); returns y, the running statistics and
    every gradient, by name."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, w, b = grad_leaf(inp["x"], dtype, fmt), grad_leaf(inp["w"], dtype), grad_leaf(inp["b"], dtype)
    gamma, beta = grad_leaf(inp["gamma"], pdtype), grad_leaf(inp["beta"], pdtype)
    res = grad_leaf(inp["res"], dtype, fmt)
    rm, rv = inp["rm"].to(pdtype, copy=True), inp["rv"].to(pdtype, copy=True)
    before = backend.calls[("conv_bn_act", "forward", name)]
    with backend.use_backend(name):
        y = conv_bn_act(x, w, b, gamma, beta, rm, rv, res, stride=inp["stride"], padding=inp["padding"],
                        training=training, momentum=0.1, eps=1e-5, relu=relu)
        leaves = [t for t in (x, w, b, gamma, beta, res) if t is not None]
        grads = iter(torch.autograd.grad(y, leaves, inp["gy"].to(dtype).contiguous(memory_format=fmt)))
    assert backend.calls[("conv_bn_act", "forward", name)] == before + 1, f"the {name} backend did not run"
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    out = dict(y=y.detach(), running_mean=rm, running_var=rv)
    for key, t in zip(GRADS, (x, w, b, gamma, beta, res)):
        if t is not None:
            out[key] = next(grads)
            assert out[key].dtype == t.dtype, f"{key}: dtype {out[key].dtype}, expected {t.dtype}"
    assert out["dx"].is_contiguous(memory_format=fmt)
    return out


def compare(name, inp, dtype, channels_last, training, relu):
    """The house rule for every output of backend `name` against torch in dtype and float64."""
    oracle = _run("torch", inp, torch.float64, channels_last, training, relu)
    eager = _run("torch", inp, dtype, channels_last, training, relu)
    got = _run(name, inp, dtype, channels_last, training, relu)
    assert set(got) == set(oracle) == set(eager)
    for key in got:
        assert got[key].shape == oracle[key].shape, key
        what = f"{name} {key} ({dtype}, training={training}, relu={relu})"
        if key == "db" and training:
            _assert_cancelled_bias_grad(got[key], eager[key], oracle[key], inp, dtype, what)
        else:
            assert_as_good(got[key], eager[key], oracle[key], name=what)


def _assert_cancelled_bias_grad(got, eager, oracle, inp, dtype, what):
    """In training BatchNorm cancels the conv bias: db = sum(dz) over the positions is exactly 0 and
    every path returns rounding noise of about eps * sum|dz|, so the house rule's floor is taken
    relative to that sum (bounded above by gamma * invstd * 3 * sum|dL/dy|, per channel) rather
    than to the oracle's magnitude (~0)."""
    z = F.conv2d(inp["x"].double(), inp["w"].double(), None, inp["stride"], inp["padding"])
    invstd = torch.rsqrt(z.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    sum_abs = 3 * inp["gamma"].double() * invstd * inp["gy"].double().abs().sum(dim=(0, 2, 3))
    err, base = max_error(got, oracle), max_error(eager, oracle)
    bound = 2 * base + ULPS * torch.finfo(dtype).eps * sum_abs.max().item()
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (torch error {base:.3g})"


@pytest.mark.parametrize("case", SMALL, ids=case_id)
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_small_fp32_vs_torch_and_float64(name, case, relu, residual, channels_last, training, poison):
    inp = _inputs(case, residual, case_seed(case, relu, residual, channels_last, training), torch.float32)
    compare(name, inp, torch.float32, channels_last, training, relu)


@pytest.mark.parametrize("case", SMALL[:2], ids=case_id)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_small_fp16_vs_torch_and_float64(name, case, training, poison):
    # A conv bias only in eval mode: in training BatchNorm cancels it, its exact gradient is 0 and what
    # any fp16 path returns for it is rounding noise (no meaningful error ratio). fp32 tests cover it.
    case = case[:-1] + (not training,)
    compare(name, _inputs(case, True, case_seed(case, training), torch.float16), torch.float16, True, training, True)


@pytest.mark.gpu
@pytest.mark.parametrize("relu,residual", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV, ids=case_id)
@pytest.mark.parametrize("name", BACKENDS)
def test_gpu_conv_cases(name, case, dtype, channels_last, training, relu, residual, poison):
    n = case[0]
    if training and n * math.prod(_out_hw(case)) == 1:
        pytest.skip("training needs more than one value per channel")
    inp = _inputs(case, residual, case_seed(case, dtype, channels_last, training, relu, residual), dtype)
    compare(name, inp, dtype, channels_last, training, relu)


@pytest.mark.gpu
@pytest.mark.parametrize("case", R50, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_gpu_resnet50_shapes(name, case, dtype, training, poison):
    compare(name, _inputs(case, True, case_seed(case, dtype, training), dtype), dtype, True, training, True)
