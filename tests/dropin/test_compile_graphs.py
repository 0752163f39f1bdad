"""Under torch.compile on a CPU (the torch backend), fastres hands the compiler the same aten graph as
torchvision: the same ops, as many of each, in the training forward, its backward and the eval forward,
NCHW and channels_last. So fastres + torch.compile is torchvision + torch.compile, by construction,
whatever a timing on a busy machine says; a change that adds or loses an op under compile fails here."""
import collections

import pytest
import torch
import torchvision
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import fastres


def _graphs(model, x):
    """Op counts of the aten graphs torch.compile(fullgraph=True) builds for a training step's forward
    and backward and for an eval forward."""
    seen = []

    def record(gm, example_inputs):
        seen.append(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        compiled(x)
    return seen


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("which", ["fused", "converted"])
def test_compiled_graphs_are_torchvisions(which, fmt):
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    if which == "fused":
        fr = fastres.FusedResNet18(num_classes=10)
        fr.load_state_dict(tv.state_dict())
    else:
        fr = fastres.convert(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=mf)
    want = _graphs(tv.to(memory_format=mf), x)
    got = _graphs(fr.to(memory_format=mf), x)
    assert len(got) == len(want) == 3
    for part, g, w in zip(("training forward", "backward", "eval forward"), got, want):
        assert g == w, f"{part}: fastres {dict(g - w)} more, {dict(w - g)} fewer than torchvision"
