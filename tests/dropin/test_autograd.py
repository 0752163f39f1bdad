"""Drop-in: autograd beyond one backward, torch.func, the meta device, torch.export, checkpointing,
serialisation - on the torch backend and, where the CPU can run it (Triton's interpreter), on the
triton backend, whose kernels hand these cases to aten (counted as "triton->torch") or differentiate
through aten (double backward).
"""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torchvision
from numerics import assert_as_good
from torch.utils.checkpoint import checkpoint

import fastres
from fastres import backend

HAS_TRITON_CPU = backend.interpreter_active() or torch.cuda.is_available()


def layer_and_twin(seed=0, relu=True, dtype=torch.float32):
    """A FusedConvBN2d and the same conv + BN as torch.nn modules (same weights)."""
    torch.manual_seed(seed)
    fused = fastres.FusedConvBN2d(3, 6, 3, padding=1, relu=relu).to(dtype)
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 1.5)
        fused.bn.bias.normal_(0, 0.2)
    twin = nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn), nn.ReLU() if relu else nn.Identity())
    return fused, twin


def test_gradgradcheck_float64_training_and_eval():
    fused, _ = layer_and_twin(dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, r: fused(a, r), (x, res))
    fused.eval()
    torch.autograd.gradgradcheck(lambda a, r: fused(a, r), (x, res))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_gradient_penalty_matches_pytorch(name):
    """d/dtheta |dL/dx|^2 (a gradient penalty: double backward) against the nn modules' in fp32 and
    float64 (oracle), with the house rule."""
    if name == "triton" and not HAS_TRITON_CPU:
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    fused, twin = layer_and_twin(relu=False)  # no ReLU: a mask tie can not flip the second derivative
    x = torch.randn(4, 3, 6, 6)
    r = torch.randn(4, 6, 6, 6)  # a random projection: a loss whose gradients do not nearly cancel

    def penalty(model, xx):
        xx = xx.clone().requires_grad_()
        (g,) = torch.autograd.grad((model(xx) * r.to(xx.dtype)).sum(), xx, create_graph=True)
        return torch.autograd.grad(g.square().sum(), list(model.parameters())[:2])  # (dL/dx needs no beta)

    with fastres.use_backend(name):
        got = penalty(fused, x)
    ref = penalty(twin, x)
    oracle = penalty(copy.deepcopy(twin).double(), x.double())
    for a, b, o, n in zip(got, ref, oracle, ["conv.weight", "bn.weight"]):
        assert_as_good(a, b, o, n)


def test_vmap_eval_equals_a_loop():
    fused, _ = layer_and_twin()
    fused.eval()
    xs = torch.randn(5, 2, 3, 6, 6)
    with torch.no_grad():
        got = torch.func.vmap(fused)(xs)
        want = torch.stack([fused(x) for x in xs])
    torch.testing.assert_close(got, want)


def test_vmap_training_fails_like_torchvision_batchnorm():
    fused, twin = layer_and_twin()
    xs = torch.randn(5, 2, 3, 6, 6)
    errors = []
    for m in (twin, fused):
        with pytest.raises(RuntimeError) as e:
            torch.func.vmap(m)(xs)
        errors.append(str(e.value).split(".")[0])
    assert errors[0] == errors[1]


def test_func_grad_and_jvp_match_autograd():
    fused, twin = layer_and_twin()
    fused.eval(), twin.eval()
    x = torch.randn(2, 3, 6, 6)
    params = dict(fused.named_parameters())
    buffers = dict(fused.named_buffers())
    g = torch.func.grad(lambda p: torch.func.functional_call(fused, (p, buffers), (x,)).sum())(params)
    twin.zero_grad()
    twin(x).sum().backward()
    torch.testing.assert_close(g["conv.weight"], twin[0].weight.grad, rtol=1e-4, atol=1e-5)
    t = torch.randn_like(x)
    _, jf = torch.func.jvp(fused, (x,), (t,))
    _, jt = torch.func.jvp(twin, (x,), (t,))
    torch.testing.assert_close(jf, jt, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON_CPU, reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
def test_func_transforms_on_a_fused_backend_run_as_aten_ops_and_are_counted():
    fused, _ = layer_and_twin()
    fused.eval()
    xs = torch.randn(3, 2, 3, 6, 6)
    backend.calls.clear()
    with fastres.use_backend("triton"), torch.no_grad():
        got = torch.func.vmap(fused)(xs)
    assert backend.calls[("conv_bn_act", "forward", "triton->torch")] > 0
    with torch.no_grad():
        torch.testing.assert_close(got, torch.stack([fused(x) for x in xs]))


def test_models_run_on_the_meta_device_like_torchvision():
    with torch.device("meta"):
        fr, tv = fastres.FusedResNet50(), torchvision.models.resnet50()
    x = torch.empty(2, 3, 64, 64, device="meta")
    assert fr(x).shape == tv(x).shape == (2, 1000)
    fr.eval()
    assert fr(x).shape == (2, 1000)
    # init on meta, then materialise and load real weights
    real = fastres.FusedResNet18()
    with torch.device("meta"):
        lazy = fastres.FusedResNet18()
    lazy.to_empty(device="cpu").load_state_dict(real.state_dict())
    real.eval(), lazy.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lazy(x), real(x))


@pytest.mark.parametrize("train", [False, True])
def test_torch_export_round_trip_with_dynamic_batch(train, tmp_path):
    model = fastres.resnet20()
    model.train(train)
    x = torch.randn(4, 3, 16, 16)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(copy.deepcopy(model), (x,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    for n in (4, 7):
        xx = torch.randn(n, 3, 16, 16)
        want = copy.deepcopy(model)(xx)
        torch.testing.assert_close(loaded(xx), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(reentrant):
    torch.manual_seed(0)
    a = fastres.FusedResNet18(num_classes=10)
    b = copy.deepcopy(a)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    a(x).sum().backward()

    def run(inp):
        h = b.maxpool(b.relu(b.bn1(b.conv1(inp))))
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            h = checkpoint(layer, h, use_reentrant=reentrant)
        return b.fc(torch.flatten(b.avgpool(h), 1))

    x2 = x.detach().clone().requires_grad_()
    run(x2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.layer2[0].conv1.weight.grad, a.layer2[0].conv1.weight.grad, rtol=1e-4, atol=1e-6)
    # the checkpointed forward ran twice, so its running statistics moved twice (as torchvision's do)
    assert int(b.layer2[0].bn1.num_batches_tracked) == 2 * int(a.layer2[0].bn1.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("kind", ["fused", "converted"])
def test_checkpointed_blocks_count_batches_as_torchvision(kind, reentrant, momentum):
    """Each block checkpointed: non-reentrant checkpointing stops its recomputation once the last tensor
    backward needs is remade (the block's final ReLU output), so a BatchNorm counts the recomputed batch
    only if num_batches_tracked moves before the op runs, as nn.BatchNorm2d moves it. With momentum=None
    that count is the averaging factor: the running statistics and eval outputs depend on it."""
    from workflow_helpers import batch, make, torchvision_net
    model = make("basic", kind)
    tv = torchvision_net("basic")
    tv.load_state_dict(model.state_dict())
    for m in (*model.modules(), *tv.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum

    def step(net, x):
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                h = checkpoint(block, h, use_reentrant=reentrant)
        net.fc(torch.flatten(net.avgpool(h), 1)).sum().backward()

    for seed in range(2):
        step(model, batch(seed)), step(tv, batch(seed))
    for (name, want), got in zip(tv.state_dict().items(), model.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(want), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_deepcopy_pickle_and_torch_save_of_the_whole_model():
    model = fastres.FusedResNet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        with torch.no_grad():
            torch.testing.assert_close(other(x), want)


def test_frozen_bn_and_gradient_accumulation_train_like_torchvision():
    tv = torchvision.models.resnet18(num_classes=10)
    fr = fastres.FusedResNet18(num_classes=10)
    fr.load_state_dict(tv.state_dict())
    xs = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    for m in (tv, fr):
        for mod in m.modules():  # frozen BatchNorm: eval mode, no parameter updates
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
                mod.weight.requires_grad_(False), mod.bias.requires_grad_(False)
        for x in xs:  # gradient accumulation over two micro-batches
            m(x).square().mean().backward()
    for (n, a), b in zip(tv.named_parameters(), fr.parameters()):
        if a.grad is None:
            assert b.grad is None, n
        else:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=n)


def test_sync_batchnorm_conversion_runs_single_process():
    fr = nn.SyncBatchNorm.convert_sync_batchnorm(fastres.FusedResNet18(num_classes=10))
    assert isinstance(fr.layer1[0].bn1, nn.SyncBatchNorm)
    fr(torch.randn(2, 3, 32, 32)).sum().backward()
    assert fr.layer1[0].conv1.weight.grad is not None
