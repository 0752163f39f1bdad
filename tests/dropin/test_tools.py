"""Drop-in: the tools that work on a torchvision ResNet work on fastres's, with the same results.

Module hooks (forward, pre, backward, global), hook-based reparametrizations (spectral_norm,
weight_norm, pruning), torch.fx (symbolic_trace, create_feature_extractor), FLOP counting, ONNX
export (both exporters, checked with onnxruntime) and torch.jit.trace. Every comparison runs the
torchvision model and the fastres model on the same weights and inputs; fastres's torch backend runs
aten's own ops, so most results are equal to rounding; the oracle rule is used where rounding differs.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune is not imported by torch.nn)
import torchvision
from numerics import assert_as_good

import fastres
from fastres import backend

FWD = ("conv_bn_act", "forward", "torch")
UNFUSED = ("conv_bn_act", "forward", "unfused")


def twins(arch="resnet18", seed=0):
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, arch)(num_classes=10)
    fr = {"resnet18": fastres.FusedResNet18, "resnet50": fastres.FusedResNet50}[arch](num_classes=10)
    fr.load_state_dict(tv.state_dict())
    return tv, fr


def test_forward_hook_on_a_conv_runs_and_sees_torchvision_output():
    tv, fr = twins()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    for name, m in (("tv", tv), ("fr", fr)):
        m.layer1[0].conv1.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.detach()))
        m.eval()
        with torch.no_grad():
            m(x)
    torch.testing.assert_close(seen["fr"], seen["tv"])


def test_forward_pre_hook_that_changes_the_bn_input_is_honoured():
    tv, fr = twins()
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for m in (tv, fr):
        m.eval()
        m.layer2[0].bn1.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2.0,))
        with torch.no_grad():
            outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = twins()[1].eval()(x)
    assert (plain - outs[1]).abs().max() > 1e-3  # the hook really changed the output


def test_hooks_cost_nothing_when_absent_and_run_unfused_when_present():
    _, fr = twins()
    x = torch.randn(2, 3, 32, 32)
    backend.calls.clear()
    fr(x)
    assert backend.calls[UNFUSED] == 0 and backend.calls[FWD] == 20
    fr.layer1[0].bn2.register_forward_hook(lambda *a: None)
    backend.calls.clear()
    fr(x)
    assert backend.calls[FWD] == 18  # only the hooked block runs module by module


def test_global_module_hook_sees_every_conv_and_bn():
    tv, fr = twins()
    x = torch.randn(2, 3, 32, 32)
    counts = []
    for m in (tv, fr):
        kinds = []
        h = nn.modules.module.register_module_forward_hook(lambda mod, i, o: kinds.append(type(mod).__name__))
        try:
            m(x)
        finally:
            h.remove()
        counts.append((kinds.count("Conv2d"), kinds.count("BatchNorm2d"), kinds.count("ReLU")))
    assert counts[0] == counts[1] == (20, 20, 17)


def test_full_backward_hook_runs():
    _, fr = twins()
    grads = []
    fr.layer3[1].conv2.register_full_backward_hook(lambda mod, gi, go: grads.append(go[0].shape))
    fr(torch.randn(2, 3, 32, 32)).sum().backward()
    assert grads == [torch.Size([2, 256, 2, 2])]


@pytest.mark.parametrize("reparam", ["spectral_norm", "weight_norm", "prune", "parametrize"])
def test_hook_based_reparametrizations_train_like_torchvision(reparam):
    tv, fr = twins()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for m in (tv, fr):
        conv = m.layer1[0].conv1
        torch.manual_seed(1)  # spectral_norm draws its power iteration's start vector
        if reparam == "spectral_norm":
            nn.utils.spectral_norm(conv)
            name = "weight_orig"
        elif reparam == "weight_norm":
            nn.utils.weight_norm(conv)
            name = "weight_v"
        elif reparam == "prune":
            torch.nn.utils.prune.l1_unstructured(conv, "weight", 0.5)
            name = "weight_orig"
        else:
            nn.utils.parametrizations.orthogonal(conv)
            name = "parametrizations.weight.original"
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        for _ in range(2):  # a second step: pruning's mask and the reparametrizations survive an update
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        grads.append(conv.get_parameter(name).grad)
    assert grads[1] is not None, f"{reparam}: the reparametrized conv stopped training"
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_fx_feature_extractor_gives_torchvision_features(arch):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tv, fr = twins(arch)
    nodes = {"layer2": "c3", "layer4": "c5", "layer1.0.relu_1": "l1"}
    tv_names, fr_names = get_graph_node_names(tv), get_graph_node_names(fr)
    assert tv_names == fr_names
    ex_tv, ex_fr = create_feature_extractor(tv.eval(), nodes), create_feature_extractor(fr.eval(), nodes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ex_tv(x), ex_fr(x)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k])


def test_fx_symbolic_trace_of_a_converted_model():
    tv, _ = twins()
    conv = fastres.convert(copy.deepcopy(tv))
    gm = torch.fx.symbolic_trace(conv)
    x = torch.randn(2, 3, 32, 32)
    tv.eval(), gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tv(x))
    calls = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, nn.Conv2d) for m in calls) == 20


def test_flop_counter_counts_like_torchvision():
    from torch.utils.flop_counter import FlopCounterMode

    tv, fr = twins()
    x = torch.randn(2, 3, 64, 64)
    totals = []
    for m in (tv, fr):
        with FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
        totals.append(counter.get_total_flops())
    assert totals[1] >= 0.95 * totals[0] and totals[1] <= 1.05 * totals[0], totals


def test_flop_counter_counts_a_fused_backend_through_its_formula():
    """On a fused backend the op is opaque; its registered formula counts its convolutions."""
    pytest.importorskip("triton")
    from torch.utils.flop_counter import FlopCounterMode

    if not backend.interpreter_active() and not torch.cuda.is_available():
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    layer = fastres.FusedConvBNReLU2d(4, 8, 3, padding=1)
    plain = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False) as ref:
        plain(x).sum().backward()
    with fastres.use_backend("triton"), FlopCounterMode(display=False) as got:
        layer(x).sum().backward()
    assert got.get_total_flops() == ref.get_total_flops() > 0


def test_onnx_export_dynamo_matches_pytorch(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    _, fr = twins()
    fr.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.onnx.export(fr, (x,), str(tmp_path / "m.onnx"), dynamo=True)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = fr(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_onnx_export_legacy_exporter(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    _, fr = twins()
    fr.eval()
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(fr, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = fr(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_jit_trace_save_load_round_trip(tmp_path):
    _, fr = twins()
    fr.eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(fr, x)
    traced.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        assert_as_good(loaded(x), fr(x), fr.double()(x.double()), "traced")
