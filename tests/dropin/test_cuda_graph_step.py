"""A whole ResNet-50 training step (stem included: the space-to-depth stem on triton), optimizer
included, captured in a CUDA graph and replayed equals the same step run eagerly, replay after replay,
on every backend. A stale re-laid or cached weight inside the graph (the failure this guards against)
shows from the second replay on, as an error of the order of the update itself.

Needs a GPU (marker gpu). Each replay is held to the house rule against a float64 eager run of the
same steps (torch backend): the captured step may be no worse than the eager step of its backend.
"""
import copy

import pytest
import torch
import torch.nn as nn
from numerics import assert_as_good

import fastres
from fastres import _ext

pytestmark = pytest.mark.gpu

EXT_BUILT, EXT_WHY = _ext.status()
BACKENDS = ["torch", "triton",
            pytest.param("cuda", marks=pytest.mark.skipif(not EXT_BUILT, reason=f"fastres._C: {EXT_WHY}"))]


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _data(i, n, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(100 + i)
    x = torch.randn(n, 3, 64, 64, device="cuda", generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), device="cuda", generator=g)
    return x, y


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize("name", BACKENDS)
def test_captured_training_step_equals_eager_over_replays(name, batch):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = fastres.FusedResNet50(num_classes=10).cuda().to(memory_format=torch.channels_last)
    graphed, eager, oracle = base, copy.deepcopy(base), copy.deepcopy(base).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in (graphed, eager, oracle)]
    with fastres.use_backend(name):
        static_x, static_y = _data(0, batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up: autotuning, optimizer state, allocations
            for i in range(3):
                x, y = _data(i, batch)
                static_x.copy_(x), static_y.copy_(y)
                _step(graphed, opts[0], static_x, static_y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = _step(graphed, opts[0], static_x, static_y)
        for i in range(3):
            x, y = _data(i, batch)
            _step(eager, opts[1], x, y)
    with fastres.use_backend("torch"):
        for i in range(3):
            x, y = _data(i, batch)
            _step(oracle, opts[2], x.double(), y)
    for r in range(3):
        x, y = _data(3 + r, batch)
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        with fastres.use_backend(name):
            loss = _step(eager, opts[1], x, y)
        with fastres.use_backend("torch"):
            want = _step(oracle, opts[2], x.double(), y)
        torch.cuda.synchronize()
        assert_as_good(static_loss.detach(), loss.detach(), want.detach(), f"loss, replay {r}")
        for (n, a), b, c in zip(eager.named_parameters(), graphed.parameters(), oracle.parameters()):
            assert_as_good(b.detach(), a.detach(), c.detach(), f"{n}, replay {r}")


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize("name", BACKENDS)
def test_graphed_step_helper_equals_eager_over_replays(name, batch):
    """fastres.GraphedStep (warm-up that does not count, capture, replay) against the eager step."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = fastres.FusedResNet50(num_classes=10).cuda().to(memory_format=torch.channels_last)
    graphed, eager, oracle = base, copy.deepcopy(base), copy.deepcopy(base).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in (graphed, eager, oracle)]
    with fastres.use_backend(name):
        step = fastres.GraphedStep(graphed, opts[0], nn.functional.cross_entropy, *_data(0, batch))
    for r in range(3):
        x, y = _data(1 + r, batch)
        loss = step(x, y).clone()
        with fastres.use_backend(name):
            want_loss = _step(eager, opts[1], x, y)
        with fastres.use_backend("torch"):
            want = _step(oracle, opts[2], x.double(), y)
        torch.cuda.synchronize()
        assert_as_good(loss, want_loss.detach(), want.detach(), f"loss, replay {r}")
        for (n, a), b, c in zip(eager.named_parameters(), graphed.parameters(), oracle.parameters()):
            assert_as_good(b.detach(), a.detach(), c.detach(), f"{n}, replay {r}")
    opts[0].param_groups[0]["lr"] = 0.01   # a float lr baked into the graph: replaying would be stale
    with pytest.raises(RuntimeError, match="hyperparameters changed"):
        step(*_data(9, batch))
