"""Drop-in: a tracer that records module calls sees fastres's model as torchvision's.

torch.export (and torch.export.unflatten, which rebuilds submodules from each node's nn_module_stack),
torch.jit.trace (scopes) and the legacy ONNX exporter built on it (node names such as
/layer1/layer1.0/conv1/Conv, which quantisation and pruning tools select nodes by) name each op after the
module that called it, and keep the ops in their order (torchvision computes a block's shortcut after
bn2 / bn3). Under these tracers fastres calls every module as torchvision's forward does
(fastres.nn.tracing_modules), so the graphs are torchvision's: the same ops, in the same order, from the
same modules. torch.fx, which also records module calls, is checked in test_tools.py.
"""
import io

import pytest
import torch
import torchvision

import fastres
from fastres.nn import tracing_modules


def twins(arch, kind, seed=0):
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, arch)(num_classes=10)
    if kind == "converted":
        import copy
        return tv, fastres.convert(copy.deepcopy(tv))
    fr = {"resnet18": fastres.FusedResNet18, "resnet50": fastres.FusedResNet50}[arch](num_classes=10)
    fr.load_state_dict(tv.state_dict())
    return tv, fr


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _export_nodes(model, x):
    ep = torch.export.export(model, (x,))
    return ep, [(str(n.target), _module_path(n)) for n in ep.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch,kind", [("resnet18", "fused"), ("resnet50", "converted")])
def test_torch_export_graph_is_torchvisions_op_for_op_and_module_for_module(arch, kind, train):
    tv, fr = twins(arch, kind)
    tv.train(train), fr.train(train)
    x = torch.randn(2, 3, 32, 32)
    _, want = _export_nodes(tv, x)
    ep, got = _export_nodes(fr, x)
    assert [t for t, _ in got] == [t for t, _ in want]          # the same ops in the same order
    assert [p for _, p in got] == [p for _, p in want]          # each called by the same module
    assert sum("conv2d" in t for t, _ in got) == sum(isinstance(m, torch.nn.Conv2d) for m in fr.modules())
    if not train:   # (the exported program computes what the model computes)
        with torch.no_grad():
            assert torch.equal(ep.module()(x), fr(x))


def test_torch_export_unflatten_rebuilds_every_conv_of_the_model():
    tv, fr = twins("resnet18", "fused")
    fr.eval()
    x = torch.randn(2, 3, 32, 32)
    flat = torch.export.unflatten(torch.export.export(fr, (x,)))
    h = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(flat.get_submodule("layer1.0.conv1")(h), fr.layer1[0].conv1(h))
        assert torch.equal(flat(x), fr(x))


def _onnx_nodes(model, x):
    onnx = pytest.importorskip("onnx")
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False)
    return [(n.op_type, n.name) for n in onnx.load_from_string(f.getvalue()).graph.node]


@pytest.mark.parametrize("arch,kind", [("resnet18", "fused"), ("resnet50", "converted")])
def test_legacy_onnx_export_names_nodes_as_torchvisions(arch, kind):
    tv, fr = twins(arch, kind)
    tv.eval(), fr.eval()
    x = torch.randn(1, 3, 32, 32)
    want = _onnx_nodes(tv, x)
    assert ("Conv", "/layer1/layer1.0/conv1/Conv") in want   # (what a tool selects nodes by)
    assert _onnx_nodes(fr, x) == want


def test_jit_trace_scopes_are_torchvisions():
    tv, fr = twins("resnet18", "fused")
    tv.eval(), fr.eval()
    x = torch.randn(2, 3, 32, 32)

    def scopes(model):
        traced = torch.jit.trace(model, (x,))
        return [n.scopeName() for n in traced.inlined_graph.nodes() if n.kind().startswith("aten::")]

    want = scopes(tv)
    assert len(set(want)) > 20 and scopes(fr) == want


def test_tracing_modules_is_on_only_under_those_tracers():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen[key] = seen.get(key, False) or tracing_modules()   # (jit.trace also reruns it eagerly)
            return x + 1

    for key, run in (("eager", lambda m, x: m(x)), ("jit.trace", lambda m, x: torch.jit.trace(m, (x,))),
                     ("export", lambda m, x: torch.export.export(m, (x,))),
                     ("fx", lambda m, x: torch.fx.symbolic_trace(m)),
                     ("compile", lambda m, x: torch.compile(m, backend="eager", fullgraph=True)(x))):
        run(Probe(), torch.randn(2))
    assert seen == {"eager": False, "jit.trace": True, "export": True, "fx": True, "compile": False}
