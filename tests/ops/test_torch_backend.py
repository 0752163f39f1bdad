"""The torch backend as production path: BatchNorm folded into the conv in eval mode (fp32 within the
house rule; fp16 / bf16 within twice torchvision's own error), training on aten's own batch norm
(the same ops as torchvision, so the same results), on a CPU and (marker gpu) on CUDA tensors."""
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
def test_eval_fold_fp32_is_as_good_as_torchvision(channels_last):
    tv, fr = twins()
    oracle = copy.deepcopy(tv).double().eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tv, fr = tv.eval().to(memory_format=fmt), fr.eval().to(memory_format=fmt)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad():
        assert_as_good(fr(x), tv(x), oracle(x.double()), "logits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eval_fold_under_autocast_within_twice_torchvision_error(dtype):
    tv, fr = twins()
    oracle = copy.deepcopy(tv).double().eval()
    tv, fr = tv.eval(), fr.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
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
