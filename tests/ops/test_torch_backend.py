"""The torch backend as production path: training and eval on torchvision's own aten ops (the same
results), BatchNorm folded into the conv inside fastres.frozen (fp32 within the house rule; fp16 / bf16
within twice torchvision's own error), on a CPU and (marker gpu) on CUDA tensors."""
import copy

import pytest
import torch
import torchvision
from model_helpers import randomize_bn
from numerics import assert_as_good

import fastres


def twins(device="cpu", seed=0):
    torch.manual_seed(seed)
    tv = torchvision.models.resnet18(num_classes=10)
    randomize_bn(tv, seed)
    fr = fastres.FusedResNet18(num_classes=10)
    fr.load_state_dict(tv.state_dict())
    return tv.to(device), fr.to(device)


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_runs_torchvisions_ops_so_results_are_equal(channels_last):
    tv, fr = twins()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tv, fr = tv.eval().to(memory_format=fmt), fr.eval().to(memory_format=fmt)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad():
        torch.testing.assert_close(fr(x), tv(x), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_eval_fold_fp32_is_as_good_as_torchvision(channels_last):
    tv, fr = twins()
    oracle = copy.deepcopy(tv).double().eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tv, fr = tv.eval().to(memory_format=fmt), fr.eval().to(memory_format=fmt)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad(), fastres.frozen(fr):
        assert_as_good(fr(x), tv(x), oracle(x.double()), "logits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_eval_fold_under_autocast_within_twice_torchvision_error(dtype):
    tv, fr = twins()
    oracle = copy.deepcopy(tv).double().eval()
    tv, fr = tv.eval(), fr.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad(), fastres.frozen(fr):
        want = oracle(x.double())
        with torch.autocast("cpu", dtype=dtype):
            got, ref = fr(x), tv(x)
    assert got.dtype == ref.dtype
    assert_as_good(got, ref, want, f"logits under {dtype} autocast", dtype=dtype)


def test_training_runs_torchvisions_ops_so_results_are_equal():
    tv, fr = twins()
    x = torch.randn(8, 3, 64, 64)
    ya, yb = tv(x), fr(x)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    ya.square().mean().backward(), yb.square().mean().backward()
    for (n, a), b in zip(tv.named_parameters(), fr.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=n)
    for (n, a), b in zip(tv.named_buffers(), fr.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_torch_path_on_cuda_tensors(amp):
    """auto runs the torch backend on CUDA tensors until the fused kernels are verified: training
    step and eval against torchvision on the GPU (float64 oracle on the GPU for eval)."""
    tv, fr = twins("cuda")
    x = torch.randn(8, 3, 64, 64, device="cuda")
    ctx = torch.autocast("cuda", dtype=amp) if amp else torch.autocast("cuda", enabled=False)
    with ctx:
        ya, yb = tv(x), fr(x)
    torch.testing.assert_close(yb, ya)
    ya.float().square().mean().backward(), yb.float().square().mean().backward()
    for (n, a), b in zip(tv.named_parameters(), fr.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    oracle = copy.deepcopy(tv).double().eval()
    tv.eval(), fr.eval()
    with torch.no_grad(), ctx:
        got, ref = fr(x), tv(x)
    with torch.no_grad():
        want = oracle(x.double())
    assert_as_good(got, ref, want, "eval logits", dtype=amp or torch.float32)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_onednn_inference_path_runs_and_is_as_good_as_aten(monkeypatch, relu, residual, channels_last):
    """Inside fastres.frozen, on a CPU in fp32 with autograd off, eval runs oneDNN's conv with add / ReLU
    post-ops; its result holds the house rule against the float64 oracle, and switching it off gives the
    aten path; outside frozen() oneDNN's prepacked path is never used."""
    import fastres.backends.torch as tb

    used = []
    real = tb.conv_bn_act_onednn
    monkeypatch.setattr(tb, "conv_bn_act_onednn", lambda *a, **k: used.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = fastres.FusedConvBN2d(8, 16, 3, padding=1, relu=relu)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5), layer.bn.bias.normal_(0, 0.2)
        layer.bn.running_mean.normal_(0, 0.2), layer.bn.running_var.uniform_(0.5, 1.5)
    layer.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 8, 12, 12).contiguous(memory_format=fmt)
    res = torch.randn(4, 16, 12, 12).contiguous(memory_format=fmt) if residual else None
    twin = torch.nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn)).eval()
    with torch.no_grad():
        layer(x, res)
        assert used == []
    with torch.no_grad(), fastres.frozen(layer):
        got = layer(x, res)
        ref, oracle = twin(x), copy.deepcopy(twin).double()(x.double())
        if residual:
            ref, oracle = ref + res, oracle + res.double()
        if relu:
            ref, oracle = ref.relu(), oracle.relu()
        monkeypatch.setattr(tb, "onednn_enabled", False)
        aten = layer(x, res)
    assert used == ([1] if channels_last else [])  # NCHW: measured slower through oneDNN, not used
    assert got.is_contiguous(memory_format=fmt)
    assert_as_good(got, ref, oracle, "oneDNN eval")
    assert_as_good(aten, ref, oracle, "aten eval")
