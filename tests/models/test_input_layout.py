"""Inside fastres.frozen, CPU inference converts an NCHW input to channels_last once
(fastres.models.input_layout), and only where nobody can see an intermediate tensor or its layout: each
condition is checked here by what a user would observe (a hook's tensor, a swapped module's input, a
gradient's strides, a traced graph), with the conversion shown to happen in the plain case so that each
test can fail."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from model_helpers import randomize_bn
from numerics import assert_as_good

import fastres
from fastres.models.input_layout import inference_input

CL = torch.channels_last


def _seen_by_layer1(model, x, grad=False, run=None):
    """Whether the stem's output (maxpool's input) is channels_last during model(x), or during run(x)
    (a hook is itself a visible observer, so this spies by wrapping maxpool's forward instead)."""
    seen = []
    forward = nn.MaxPool2d.forward   # (patched on the class: a forward set on the instance stops the conversion)

    def spy(self, t):
        seen.append(t.is_contiguous(memory_format=CL) and not t.is_contiguous())
        return forward(self, t)

    nn.MaxPool2d.forward = spy
    try:
        with torch.set_grad_enabled(grad):
            (run or model)(x)
    finally:
        nn.MaxPool2d.forward = forward
    return seen[0]


def _models():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    randomize_bn(tv, 0)
    fr = fastres.FusedResNet18(num_classes=10)
    fr.load_state_dict(tv.state_dict())
    conv = fastres.convert(copy.deepcopy(tv))
    return tv.eval(), fr.eval(), conv.eval()


@pytest.mark.parametrize("which", ["fused", "converted"])
def test_cpu_inference_runs_channels_last_and_returns_torchvisions_logits(which):
    tv, fr, conv = _models()
    model = fr if which == "fused" else conv
    x = torch.randn(3, 3, 48, 48)
    assert not _seen_by_layer1(model, x)  # outside frozen(): torchvision's NCHW run
    with fastres.frozen(model):
        assert _seen_by_layer1(model, x)  # the conversion happens (else every test below proves nothing)
        with torch.no_grad():
            got, ref, want = model(x), tv(x), copy.deepcopy(tv).double()(x.double())
        assert got.shape == ref.shape and got.is_contiguous() and got.stride() == ref.stride()
        assert_as_good(got, ref, want, "logits")
        with torch.inference_mode():
            torch.testing.assert_close(model(x), got, rtol=0, atol=0)
    assert not _seen_by_layer1(model, x)  # nothing outlives the context


def test_cifar_net_converts_too():
    model = fastres.resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), fastres.frozen(model):
        assert inference_input(model, x).is_contiguous(memory_format=CL)


@pytest.mark.parametrize("case", ["training", "grad enabled", "float64", "channels_last already", "3-D",
                                  "autocast"])
def test_left_alone_outside_plain_cpu_inference(case):
    _, fr, _ = _models()
    x = torch.randn(2, 3, 32, 32)
    grad = case == "grad enabled"
    if case == "training":
        fr.train()
    if case == "float64":
        fr, x = fr.double(), x.double()
    if case == "channels_last already":
        x = x.contiguous(memory_format=CL)
    if case == "3-D":
        x = x[0]
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"), \
            fastres.frozen(fr):
        assert inference_input(fr, x) is x


def test_grad_enabled_eval_keeps_torchvisions_gradient_layouts():
    """Eval with gradients on (a frozen-BN fine-tune, a saliency map): the input's and the weights'
    gradients have torchvision's strides, since nothing is converted."""
    tv, fr, _ = _models()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with fastres.frozen(fr):
        assert not _seen_by_layer1(fr, x.detach(), grad=True)
        fr(x).sum().backward()
    assert x.grad.is_contiguous()
    for n, p in fr.named_parameters():
        assert p.grad.stride() == p.stride(), n


def test_a_hook_anywhere_sees_torchvisions_nchw_tensors():
    tv, fr, conv = _models()
    x = torch.randn(2, 3, 32, 32)
    for model in (fr, conv):
        seen = []
        h = model.layer3[0].register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous()))
        with torch.no_grad(), fastres.frozen(model):
            model(x)
            h.remove()
            assert seen == [True]
            assert _seen_by_layer1(model, x)   # the hook removed: converted again
    h = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        with torch.no_grad(), fastres.frozen(fr):
            assert inference_input(fr, x) is x
    finally:
        h.remove()


class ViewingHead(nn.Module):
    """A user's own module that views its input as NCHW would allow."""

    def forward(self, t):
        return t.view(t.shape[0], -1)


def test_a_swapped_in_user_module_gets_nchw_input():
    _, fr, _ = _models()
    fr.avgpool = ViewingHead()            # .view() fails on a channels_last tensor of H, W > 1
    fr.fc = nn.Linear(512 * 2 * 2, 10)
    with torch.no_grad(), fastres.frozen(fr):
        assert fr(torch.randn(2, 3, 64, 64)).shape == (2, 10)
        fr.layer4[1].relu = nn.SiLU()     # a replaced activation: a class fastres does not know
        assert inference_input(fr, torch.randn(2, 3, 32, 32)).is_contiguous()


def test_traced_and_compiled_graphs_are_torchvisions():
    _, fr, _ = _models()
    x = torch.randn(2, 3, 32, 32)
    with fastres.frozen(fr):
        gm = torch.fx.symbolic_trace(fr)
        assert not any("contiguous" in str(n.target) for n in gm.graph.nodes)
        assert not _seen_by_layer1(fr, x, run=lambda t: torch.jit.trace(fr, t))

        def probe(t):
            return inference_input(fr, t)

        with torch.no_grad():
            y = torch.compile(probe, fullgraph=True, backend="eager")(x)
        assert y.is_contiguous()


def test_vmap_inside_frozen_runs_as_without_it():
    """torch.func.vmap: its batched tensors refuse a channels_last query, so the context is checked first."""
    model = fastres.resnet20().eval()
    x = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        want = torch.func.vmap(model)(x)
        with fastres.frozen(model):
            got = torch.func.vmap(model)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_forward_ad_inside_frozen_keeps_the_tangent():
    """torch.no_grad does not stop forward-mode AD: its tangent must come through as torchvision's does
    (oneDNN's prepacked op has no tangent formula, so neither the conversion nor that op may run)."""
    import torch.autograd.forward_ad as fwAD

    tv, fr, _ = _models()
    x, v = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    for data in (x, x.contiguous(memory_format=CL)):
        with torch.no_grad(), fwAD.dual_level():
            want = fwAD.unpack_dual(tv(fwAD.make_dual(data, v))).tangent
            with fastres.frozen(fr):
                got = fwAD.unpack_dual(fr(fwAD.make_dual(data, v))).tangent
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_forward_patched_on_an_instance_gets_nchw_input():
    """Hooks in the style of accelerate's add_hook_to_module replace `forward` on the instance."""
    _, fr, _ = _models()
    fr.avgpool.forward = lambda t: t.view(t.shape[0], -1)
    fr.fc = nn.Linear(512 * 2 * 2, 10).eval()
    with torch.no_grad(), fastres.frozen(fr):
        assert fr(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_a_submodule_in_training_mode_gets_nchw_input():
    """MC dropout: model.eval() with a Dropout put back in train mode draws its mask in memory order,
    so it must see torchvision's layout to give torchvision's result for the same seed."""
    tv, fr, _ = _models()
    for m in (tv, fr):
        m.layer2.append(nn.Dropout(0.5))
        m.layer2[-1].train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), fastres.frozen(fr):
        torch.manual_seed(1)
        want = tv(x)
        torch.manual_seed(1)
        got = fr(x)
    # (a mask drawn over another layout differs by O(1); the fold's rounding is ~1e-6 of the magnitude)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
