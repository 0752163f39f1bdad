"""pooled_linear: a vouched frozen call's global average pooling + nn.Linear head in one C++ call
(csrc/cpu/pooled_linear.cpp, fastres.backends.torch.pooled_linear_vouched), against torch's own ops.

- The kernel (each ISA this CPU has: AVX-512F, AVX2 + FMA) holds the house rule against the float64
  oracle, torch's F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1)) the same-dtype reference, on fresh random
  inputs: batch 1-16, channel counts that fill its vector lanes and ones that leave a tail, odd and even
  output counts, planes 1x1 to 7x7, channels_last, NCHW and a strided view, with and without bias, its
  output poisoned with NaN before the call.
- It declines (False, the output left as it was) what it does not take, and the wrapper declines under a
  torch function or dispatch mode (a FLOP counter sees torch's ops), for a Linear subclass and past 16 rows.
- A frozen ResNet's logits, with the kernel having run (per-layer and through a live plan), equal
  torchvision's within the house rule.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from numerics import assert_as_good
from torch.utils.flop_counter import FlopCounterMode
from workflow_helpers import batch, check_eval, make

import fastres
from fastres import _native
from fastres.backends import torch as aten_backend
from fastres.models import plan

pytestmark = pytest.mark.skipif(_native.cpu is None, reason=f"fastres._cpu is not built: {_native.why}")
CL = torch.channels_last
ISAS = {"avx512": 2, "avx2": 1}


def _operands(n, c, h, w, k, layout, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, 2 * w if layout == "strided" else w, generator=gen)   # (post-ReLU features)
    x = x[..., ::2] if layout == "strided" else x.contiguous(memory_format=CL if layout == "channels_last" else
                                                               torch.contiguous_format)
    weight = torch.randn(k, c, generator=gen) / c ** 0.5
    b = torch.randn(k, generator=gen) if bias else None
    return x, weight, b


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


_HAS = {2: {"avx512f"} <= _cpu_flags(), 1: {"avx2", "fma"} <= _cpu_flags()}


def _run(isa, x, weight, b):
    if not _HAS[isa]:
        pytest.skip(f"this CPU has no {[k for k, v in ISAS.items() if v == isa][0]} (its /proc/cpuinfo flags)")
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"))
    assert _native.cpu.pooled_linear(x, weight, b, out, isa), "the kernel declined what it takes"
    return out


@pytest.mark.parametrize("isa", list(ISAS.values()), ids=list(ISAS))
@pytest.mark.parametrize("n,c,h,w,k", [(1, 512, 7, 7, 1000), (8, 2048, 2, 2, 1000), (16, 512, 2, 2, 1000),
                                       (3, 100, 3, 5, 7), (13, 37, 1, 1, 3), (2, 64, 8, 8, 10), (9, 24, 4, 4, 1)],
                         ids=["r18-b1", "r50-b8", "r18-b16", "tails", "13-rows", "cifar", "one-output"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_kernel_holds_the_house_rule(isa, n, c, h, w, k, layout, bias):
    x, weight, b = _operands(n, c, h, w, k, layout, bias, seed=n * 1000 + c + k)
    got = _run(isa, x, weight, b)
    ref = F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), weight, b)
    oracle = F.linear(x.double().mean((2, 3)), weight.double(), None if b is None else b.double())
    assert got.shape == ref.shape and not got.isnan().any()
    assert_as_good(got, ref, oracle, f"pooled head {n}x{c}x{h}x{w} -> {k}")


_DECLINED = {
    "17 rows": lambda x, w, b, o: (torch.rand(17, 8, 2, 2), w, b, torch.empty(17, 5)),
    "float64 input": lambda x, w, b, o: (x.double(), w, b, o),
    "strided weight": lambda x, w, b, o: (x, torch.randn(8, 5).t(), b, o),
    "bias length": lambda x, w, b, o: (x, w, torch.randn(4), o),
    "channels differ": lambda x, w, b, o: (x, torch.randn(5, 9), b, o),
    "output shape": lambda x, w, b, o: (x, w, b, torch.empty(3, 4)),
    "strided output": lambda x, w, b, o: (x, w, b, torch.empty(5, 3).t()),
    "negative view": lambda x, w, b, o: (torch._neg_view(x), w, b, o),
    "3-D input": lambda x, w, b, o: (x[0], w, b, o),
    "not a tensor": lambda x, w, b, o: (x, w.tolist(), b, o),
}


@pytest.mark.parametrize("case", list(_DECLINED))
def test_kernel_declines_what_it_does_not_take(case):
    x, w, b, out = _DECLINED[case](torch.rand(3, 8, 2, 2), torch.randn(5, 8), torch.randn(5), torch.empty(3, 5))
    out.fill_(7.0)
    for isa in ISAS.values():
        assert _native.cpu.pooled_linear(x, w, b, out, isa) is False, case
    assert (out == 7.0).all(), "a declined call wrote its output"


def test_kernel_declines_an_isa_it_does_not_have():
    x, w = torch.rand(2, 8, 2, 2), torch.randn(5, 8)
    for isa in (0, 3, -1):
        assert _native.cpu.pooled_linear(x, w, None, torch.empty(2, 5), isa) is False


class _Counted(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Passing(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _MyLinear(nn.Linear):
    pass


class _Seen(torch.Tensor):
    """A tensor subclass that records the torch functions called on it."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("where", ["buffer", "attribute", "subclass"])
def test_wrapper_reads_the_bias_nn_linear_reads(where):
    """nn.Linear.forward reads self.bias (a parameter, a buffer or an attribute): so does the wrapper, and a
    tensor subclass there keeps seeing its own ops (torch's path)."""
    fc = nn.Linear(8, 5)
    bias = torch.randn(5)
    del fc.bias
    if where == "buffer":
        fc.register_buffer("bias", bias)
    elif where == "attribute":
        fc.bias = bias
    else:
        fc.bias = nn.Parameter(bias.as_subclass(_Seen))
    x = torch.rand(3, 8, 2, 2)
    with torch.no_grad():
        got = aten_backend.pooled_linear_vouched(x, fc)
        _Seen.seen.clear()
        want = fc(x.mean((2, 3)))
    if where == "subclass":
        assert got is None and _Seen.seen, "a subclass bias did not see its ops"
        return
    if not aten_backend._HEAD_ISA:
        pytest.skip("torch reports no AVX2 or AVX-512 on this CPU: the kernel is not used")
    assert got is not None
    oracle = F.linear(x.double().mean((2, 3)), fc.weight.double(), bias.double())
    assert_as_good(got, want, oracle, f"bias as {where}")


@pytest.mark.parametrize("case", ["plain", "flop counter", "dispatch mode", "function mode", "subclass", "17 rows"])
def test_wrapper_steps_aside_where_torch_must_see_the_ops(case):
    fc = (_MyLinear if case == "subclass" else nn.Linear)(8, 5)
    x = torch.rand(17 if case == "17 rows" else 3, 8, 2, 2)
    modes = {"flop counter": FlopCounterMode(display=False), "dispatch mode": _Counted(),
             "function mode": _Passing()}
    with torch.no_grad():
        if case in modes:
            with modes[case]:
                got = aten_backend.pooled_linear_vouched(x, fc)
        else:
            got = aten_backend.pooled_linear_vouched(x, fc)
    if case == "plain":
        assert got is not None or not aten_backend._HEAD_ISA
    else:
        assert got is None


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = _native.cpu

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def pooled_linear(self, *args):
            took = real.pooled_linear(*args)
            calls.append(took)
            return took

    monkeypatch.setattr(aten_backend, "_native", Spy())
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)
    return calls


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
@pytest.mark.parametrize("use_plan", [False, True], ids=["per-layer", "plan"])
def test_frozen_logits_through_the_kernel_match_torchvision(arch, use_plan, kernel_calls):
    if not aten_backend._HEAD_ISA:
        pytest.skip("torch reports no AVX2 or AVX-512 on this CPU: the kernel is not used")
    model = make(arch).eval()
    with torch.no_grad(), fastres.frozen(model, plan=use_plan):
        for _ in range(5):
            model(batch())
        assert plan.live(model) == (use_plan and plan._fuser_available())
        kernel_calls.clear()
        check_eval(model, arch, what=f"frozen logits through pooled_linear ({arch})")
        check_eval(model, arch, x=batch(2, CL), what="channels_last input")
    assert kernel_calls == [True, True]


def _fused_adam_step(model):
    opt = torch.optim.Adam(model.fc.parameters(), lr=0.05, fused=True)
    model.fc.weight.grad = torch.randn_like(model.fc.weight)
    model.fc.bias.grad = torch.randn_like(model.fc.bias)
    opt.step()   # (leaves the version counters alone)


def _swap_head(model):
    torch.manual_seed(7)
    model.fc = nn.Linear(model.fc.in_features, model.fc.out_features).eval()


_EDITS = {
    ".data edit": lambda m: m.fc.weight.data.mul_(-1.5),
    "bias .data edit": lambda m: m.fc.bias.data.add_(3.0),
    "fused Adam step": _fused_adam_step,
    "swapped head": _swap_head,
    "weight rebound": lambda m: setattr(m.fc, "weight", nn.Parameter(torch.randn_like(m.fc.weight))),
}


@pytest.mark.parametrize("edit", list(_EDITS))
@pytest.mark.parametrize("use_plan", [False, True], ids=["per-layer", "plan"])
def test_the_head_follows_every_edit_between_calls(edit, use_plan, kernel_calls):
    """The kernel reads the live head on every call (nothing of it is kept): after each change between two
    frozen calls the logits are torchvision's on the same weights."""
    if not aten_backend._HEAD_ISA:
        pytest.skip("torch reports no AVX2 or AVX-512 on this CPU: the kernel is not used")
    model = make("basic").eval()
    with torch.no_grad(), fastres.frozen(model, plan=use_plan):
        for _ in range(5):
            model(batch())
        with torch.enable_grad():
            _EDITS[edit](model)
        kernel_calls.clear()
        check_eval(model, "basic", what=f"frozen logits after a {edit}")
        model(batch())   # (and the call after: a plan's guard armed again)
        check_eval(model, "basic", what=f"frozen logits, the second call after a {edit}")
    assert kernel_calls and all(kernel_calls)
