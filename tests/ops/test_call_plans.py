"""conv_bn_act's call plans (fastres/ops/conv_bn_act.py): in plain eager mode a fused call takes the plan
remembered for its key. Every input of a plan must be in its key, so these tests change one thing at a
time between two calls with the same everything else (the second call would find the first one's plan if
the key missed it) and check the result against the torch backend on the same inputs; a bad call must
raise every time, and a plan must hold nothing derived from a tensor's values. On the triton backend
(CPU tensors through Triton's interpreter, or a GPU)."""
import pytest
import torch
from numerics import assert_as_good

import fastres
from fastres import backend
from fastres.errors import InputDtypeError, InputShapeError
from fastres.kernels import interpreter_active

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEV == "cpu" and not interpreter_active(),
                                reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
CL, NCHW = torch.channels_last, torch.contiguous_format


def _inputs(fmt=NCHW, cin=16, cout=16, requires_grad=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, 6, 6, generator=gen).to(DEV, dtype).contiguous(memory_format=fmt)
    w = (torch.randn(cout, cin, 3, 3, generator=gen) * 0.2).to(DEV, dtype)
    gamma = (torch.rand(cout, generator=gen) + 0.5).to(DEV)
    beta = torch.randn(cout, generator=gen).to(DEV)
    for t in (x, w, gamma, beta):
        t.requires_grad_(requires_grad)
    return x, w, gamma, beta


def _run(name, x, w, gamma, beta, res=None, **kw):
    """(y, grads of the tensors that require them, running stats after) on backend `name`."""
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    rm, rv = torch.zeros(w.shape[0], device=DEV, dtype=sdt), torch.ones(w.shape[0], device=DEV, dtype=sdt)
    with fastres.use_backend(name):
        y = fastres.ops.conv_bn_act(x, w, None, gamma, beta, rm, rv, res, padding=kw.pop("padding", 1), **kw)
    leaves = [t for t in (x, w, gamma, beta, res) if t is not None and t.requires_grad]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)   # (ones: dx ~ 0 through BN)
    grads = torch.autograd.grad(y, leaves, g) if y.requires_grad else ()
    return y, grads, (rm, rv)


def _same_as_torch(x, w, gamma, beta, res=None, **kw):
    got, got_g, got_rs = _run("triton", x, w, gamma, beta, res, **dict(kw))
    ref, ref_g, ref_rs = _run("torch", x, w, gamma, beta, res, **dict(kw))
    oracle = _run("torch", *(None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                             for t in (x, w, gamma, beta, res)), **dict(kw))
    assert got.dtype == ref.dtype and got.shape == ref.shape
    fmt = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else NCHW
    assert got.is_contiguous(memory_format=fmt)
    assert_as_good(got, ref, oracle[0], name="y")
    assert len(got_g) == len(ref_g)
    for i, (a, b, o) in enumerate(zip(got_g, ref_g, oracle[1])):
        assert_as_good(a, b, o, name=f"grad {i}")
    for a, b, o in zip(got_rs, ref_rs, oracle[2]):
        assert_as_good(a, b, o, name="running stats")
    return got


@pytest.mark.parametrize("first,second", [(NCHW, CL), (CL, NCHW)])
def test_input_layout_changes_between_calls(first, second, monkeypatch):
    """x's strides are in the key: the output, and grad_y's layout as the backend's backward receives it
    (the contract: x's memory format), follow each call's x."""
    tb = backend.module("triton")
    real, seen = tb.conv_bn_act_backward, []

    def spy(grad_y, x, *rest):
        seen.append(grad_y.is_contiguous(memory_format=CL) and not grad_y.is_contiguous())
        return real(grad_y, x, *rest)

    monkeypatch.setattr(tb, "conv_bn_act_backward", spy)
    for fmt in (first, second):
        _same_as_torch(*_inputs(fmt))
    assert seen == [first == CL, second == CL]


def test_requires_grad_and_grad_mode_change_between_calls():
    """Whether an autograd node is made (and the ReLU mask saved) follows requires_grad and grad mode."""
    y = _same_as_torch(*_inputs(CL, requires_grad=False), relu=True)
    assert y.grad_fn is None
    y = _same_as_torch(*_inputs(CL), relu=True)
    assert y.grad_fn is not None
    with torch.no_grad():
        y = _same_as_torch(*_inputs(CL), relu=True)
    assert y.grad_fn is None
    x, w, gamma, beta = _inputs(CL)
    w.requires_grad_(False)   # only some inputs need a gradient
    _same_as_torch(x, w, gamma, beta, relu=True)


def test_conv_arguments_and_epilogue_change_between_calls():
    x, w, gamma, beta = _inputs(CL)
    for kw in (dict(stride=1), dict(stride=2), dict(stride=(2, 1)), dict(padding=0), dict(relu=True),
               dict(training=False), dict(stride=1)):
        _same_as_torch(x, w, gamma, beta, **kw)
    res = torch.randn(2, 16, 6, 6, device=DEV)
    for r in (res, res.contiguous(memory_format=CL), None):
        _same_as_torch(x, w, gamma, beta, r, relu=True)


@pytest.mark.skipif(DEV != "cpu", reason="CPU autocast to float16 (the interpreter has no bfloat16)")
def test_autocast_changes_between_calls():
    """The autocast dtype is in the key: the operands are cast under autocast, not outside it."""
    x, w, gamma, beta = _inputs(CL)
    for on in (False, True, False):
        with torch.autocast("cpu", dtype=torch.float16, enabled=on), fastres.use_backend("triton"):
            y = fastres.ops.conv_bn_act(x, w, None, gamma, beta, padding=1)
        assert y.dtype == (torch.float16 if on else torch.float32)


def test_backend_choice_and_handover_follow_each_call():
    x, w, gamma, beta = _inputs(CL)
    backend.calls.clear()
    _same_as_torch(x, w, gamma, beta)
    assert backend.calls[("conv_bn_act", "forward", "triton")] == 1
    assert backend.calls[("conv_bn_act", "backward", "triton")] == 1
    xg = torch.randn(2, 16, 6, 6, device=DEV).contiguous(memory_format=CL)
    wg = torch.randn(16, 8, 3, 3, device=DEV)   # groups=2: outside the Triton conv, handed to torch per call
    for _ in range(2):
        with fastres.use_backend("triton"):
            fastres.ops.conv_bn_act(xg, wg, None, gamma, beta, padding=1, groups=2)
    assert backend.calls[("conv_bn_act", "forward", "triton->torch")] == 2


def test_bad_call_raises_every_time():
    x, w, gamma, beta = _inputs(CL)
    res = torch.randn(2, 16, 5, 5, device=DEV)
    with fastres.use_backend("triton"):
        for _ in range(2):
            with pytest.raises(InputShapeError, match="expected residual of shape"):
                fastres.ops.conv_bn_act(x, w, None, gamma, beta, residual=res, padding=1)
            with pytest.raises(InputShapeError, match="bn_weight of shape"):
                fastres.ops.conv_bn_act(x, w, None, gamma[:8], beta, padding=1)
            with pytest.raises(InputDtypeError, match="weight of the input's dtype"):
                fastres.ops.conv_bn_act(x, w.half(), None, gamma, beta, padding=1)
            with pytest.raises(ValueError, match="stride must be an int or a pair"):
                fastres.ops.conv_bn_act(x, w, None, gamma, beta, stride=(1, 1, 1), padding=1)


@pytest.mark.parametrize("edit", ["in_place", "data"])
def test_plan_holds_no_values(edit):
    """Changing a tensor's values in ways a version counter misses changes the next call's result."""
    x, w, gamma, beta = _inputs(CL)
    before, _, _ = _run("triton", x, w, gamma, beta)
    with torch.no_grad():
        if edit == "in_place":
            w.mul_(-1.5)
            gamma.add_(1.0)
        else:
            w.data.mul_(-1.5)
            gamma.data.add_(1.0)
    after = _same_as_torch(x, w, gamma, beta)
    assert not torch.allclose(before, after)


def test_module_reads_its_tensors_and_hooks_on_every_call():
    """FusedConvBN2d's forward (fastres/nn.py) reads the modules' parameters, buffers and hooks per call:
    a parameter replaced, a hook added, a parametrized weight each reach the next call."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    layer = fastres.FusedConvBNReLU2d(16, 16, 3, padding=1).to(DEV)
    plain = torch.nn.Sequential(layer.conv, layer.bn, torch.nn.ReLU())   # the same modules, unfused
    x = torch.randn(2, 16, 6, 6, device=DEV).contiguous(memory_format=CL)

    def check():
        bn_state = {k: v.clone() for k, v in layer.bn.state_dict().items()}
        with fastres.use_backend("triton"):
            got = layer(x)
        layer.bn.load_state_dict(bn_state)
        want = plain(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    check()
    layer.conv.weight = torch.nn.Parameter(torch.randn_like(layer.conv.weight))
    check()
    seen = []
    handle = layer.bn.register_forward_hook(lambda *a: seen.append(1))
    with fastres.use_backend("triton"):
        layer(x)
    assert seen == [1]   # a hook: the modules ran themselves
    handle.remove()

    class Scale(torch.nn.Module):
        def forward(self, w):
            return w * 0.5

    parametrize.register_parametrization(layer.conv, "weight", Scale())
    check()
