"""fastres.models.pool.max_pool: the stem's max pooling through aten's channels_last kernel for NCHW CPU
input, bit-equal to the module (values, NaN positions, strides) and taken only where nobody could tell;
each refusal is checked with the fast path shown to run in the plain case, so every test can fail."""
import copy
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
import fastres.models.pool as pool_mod
from fastres.models.pool import max_pool

CL = torch.channels_last
GEOMETRIES = [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
              dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=1, padding=1, dilation=2),
              dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))]
SHAPES = [(1, 64, 56, 56), (2, 3, 9, 11), (3, 17, 7, 6), (2, 8, 3, 3), (1, 1, 5, 5)]


@pytest.fixture
def layouts(monkeypatch):
    """The layout of every tensor max_pool's fast path hands to F.max_pool2d (True: channels_last); the
    module's own calls are not seen."""
    seen = []

    def spy(t, *args, **kwargs):
        seen.append(t.is_contiguous(memory_format=CL) and not t.is_contiguous())
        return F.max_pool2d(t, *args, **kwargs)

    monkeypatch.setattr(pool_mod, "F", types.SimpleNamespace(max_pool2d=spy))
    return seen


def _input(shape, dtype, seed):
    """relu'd normals (half the window's elements tie at 0) with NaN and -inf sprinkled in."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).relu().to(dtype)
    x.view(-1)[::37] = float("nan")
    x.view(-1)[::53] = float("-inf")
    return x


def _same(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_bit_equal_to_the_module(dtype, geometry, layouts):
    pool = nn.MaxPool2d(**GEOMETRIES[geometry])
    for i, shape in enumerate(SHAPES):
        x = _input(shape, dtype, 10 * geometry + i)
        got = max_pool(pool, x)
        assert _same(got, pool(x)), shape
    # every call went through the channels_last kernel but (1, 1, 5, 5), which is channels_last already
    assert layouts == [True] * (len(SHAPES) - 1)


def test_a_call_the_kernel_rejects_raises_torchvisions_error(layouts):
    pool, x = nn.MaxPool2d(3, 2), torch.randn(1, 4, 2, 2)
    with pytest.raises(RuntimeError) as ours:
        max_pool(pool, x)
    with pytest.raises(RuntimeError) as theirs:
        pool(x)
    assert str(ours.value) == str(theirs.value)


REFUSALS = {
    "needs grad": lambda pool, x: (pool, x.requires_grad_()),
    "returns indices": lambda pool, x: (nn.MaxPool2d(3, 2, 1, return_indices=True), x),
    "subclass": lambda pool, x: (type("MyPool", (nn.MaxPool2d,), {})(3, 2, 1), x),
    "channels_last input": lambda pool, x: (pool, x.contiguous(memory_format=CL)),
    "strided input": lambda pool, x: (pool, x[:, :, :, ::2]),
    "int input": lambda pool, x: (pool, (x * 10).to(torch.int32)),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_where_a_user_could_tell(case, layouts):
    x = torch.randn(2, 4, 9, 9)
    pool = nn.MaxPool2d(3, 2, 1)
    max_pool(pool, x)
    assert layouts == [True]   # the plain case takes the fast path
    layouts.clear()
    pool, x = REFUSALS[case](pool, x)
    got = max_pool(pool, x)
    ref = pool(x)
    assert layouts == []
    assert _same(got[0] if isinstance(got, tuple) else got, ref[0] if isinstance(ref, tuple) else ref)


def test_hooks_and_patched_forwards_see_the_input_as_given(layouts, monkeypatch):
    x = torch.randn(2, 4, 9, 9)
    pool = nn.MaxPool2d(3, 2, 1)
    seen, out_stride = [], pool(x).stride()
    handle = pool.register_forward_pre_hook(lambda m, a: seen.append(a[0].stride()))
    max_pool(pool, x)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(o.stride()))
    max_pool(pool, x)
    handle.remove()
    pool.forward = lambda t: seen.append(t.stride()) or F.max_pool2d(t, 3, 2, 1)
    max_pool(pool, x)
    del pool.forward
    real = nn.MaxPool2d.forward
    monkeypatch.setattr(nn.MaxPool2d, "forward", lambda self, t: seen.append(t.stride()) or real(self, t))
    max_pool(pool, x)
    assert seen == [x.stride(), out_stride] + [x.stride()] * 2
    assert layouts == []


def test_traced_and_transformed_calls_see_one_max_pool2d(layouts):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, t):
            return max_pool(self.body[1], self.body[0](t))

    net, x = Net().eval(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = net(x)
        assert layouts == [True]   # eager: the fast path (so that each check below can fail)
        traced = torch.jit.trace(net, x, check_trace=False)
        assert layouts == [True]
        assert "contiguous" not in str(traced.graph) and "clone" not in str(traced.graph)
        assert torch.equal(traced(x), want)
        gm = torch.fx.symbolic_trace(net)
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body.0", "body.1"]
        assert torch.equal(gm(x), want)
        assert layouts == [True]
        assert torch.equal(torch.func.vmap(lambda t: net(t[None])[0])(x), want)
        assert layouts == [True]
        ep = torch.export.export(net, (x,))
        assert layouts == [True]
        assert not any("clone" in str(n.target) for n in ep.graph.nodes)
        assert torch.equal(ep.module()(x), want)


@pytest.mark.parametrize("which", ["fused", "converted"])
def test_resnet_eval_bit_equal_to_torchvision_and_takes_the_path(which, layouts):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    ref = tvm.resnet18(num_classes=10).eval()
    model = fastres.FusedResNet18(num_classes=10) if which == "fused" else fastres.convert(copy.deepcopy(ref))
    model.load_state_dict(ref.state_dict())
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert layouts == [True]
    assert torch.equal(got, want)
    layouts.clear()
    xg = x.clone().requires_grad_()
    got = model(xg)
    assert layouts == [] and torch.equal(got, ref(x))   # (autograd: the module as torchvision runs it)
