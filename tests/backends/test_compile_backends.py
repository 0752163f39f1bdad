"""torch.compile(fullgraph=True) over the fused backends: a fused training step (forward + backward) of
conv_bn_act and bn_act compiles without a graph break, runs the backend's kernels (counted), and gives
the eager results (outputs, input gradients, running statistics)."""
import copy

import pytest
import torch
import torch.nn as nn
from fused_params import BACKENDS, DEVICE

import fastres
from fastres import backend
from fastres.nn import bn_act_modules


def _step(fn, x):
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("op", ["conv_bn_act", "bn_act"])
@pytest.mark.parametrize("name", BACKENDS)
def test_compiled_training_step_runs_the_backend_and_matches_eager(name, op):
    torch.manual_seed(0)
    if op == "conv_bn_act":
        eager_mod = fastres.FusedConvBNReLU2d(4, 6, 3, padding=1).to(DEVICE)
        compiled_mod = copy.deepcopy(eager_mod)
        x_shape, stats = (2, 4, 5, 5), lambda m: m.bn
    else:
        eager_mod = nn.BatchNorm2d(6).to(DEVICE)
        compiled_mod = copy.deepcopy(eager_mod)
        x_shape, stats = (2, 6, 5, 5), lambda m: m
    x = torch.randn(x_shape, device=DEVICE)
    with backend.use_backend(name):
        fn = compiled_mod if op == "conv_bn_act" else (lambda t: bn_act_modules(t, compiled_mod, relu=True))
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        backend.calls.clear()
        got, gx = _step(compiled, x.clone().requires_grad_())
        assert backend.calls[(op, "forward", name)] == 1 and backend.calls[(op, "backward", name)] == 1, \
            dict(backend.calls)
        ref = eager_mod if op == "conv_bn_act" else (lambda t: bn_act_modules(t, eager_mod, relu=True))
        want, wx = _step(ref, x.clone().requires_grad_())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(stats(compiled_mod).running_mean, stats(eager_mod).running_mean)
    torch.testing.assert_close(stats(compiled_mod).running_var, stats(eager_mod).running_var)
