"""Op-level benchmark cases and their cost model.

* :func:`make_host`: the per-op host-overhead row, one conv3x3 + BN + ReLU on a tiny tensor (2x8x4x4 by
  default), where the time is Python and dispatch, not arithmetic: fastres' FusedConvBNReLU2d against
  nn.Conv2d + nn.BatchNorm2d + nn.ReLU modules holding the same weights; forward (training-mode BN, no_grad),
  inference (eval mode, no_grad) and forward + backward.
* :func:`make_op` over every distinct conv shape of ResNet-50 (:func:`resnet50_conv_shapes`): training
  forward, forward + backward, inference with BN folded, and BN (+ add) (+ ReLU) alone, with
  :func:`op_cost`, the bytes each case must move and the FLOPs it must do (for GB/s and TFLOP/s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.bench.config import (
    Setup,
    backend_of,
    compiled,
    copy_weights,
    is_compiled,
    is_fastres,
    memory_format,
    provider_context,
)

Tensor = torch.Tensor

HOST_KINDS = ("fwd", "infer", "fwdbwd")


# ----------------------------------------------------------------------------------------------------
# Per-op host overhead
# ----------------------------------------------------------------------------------------------------
def make_host(kind: str, provider: str, setup: Setup, seed: int = 0) -> Callable[[], object]:
    """One conv3x3 + BN + ReLU module call on a (batch, channels, size, size) tensor, for `provider`:
    fastres' FusedConvBNReLU2d, or nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU) with the same weights;
    under torch.compile for the compiled providers. `kind`: "fwd" (training-mode BN under no_grad),
    "infer" (eval mode, no_grad), "fwdbwd" (training forward, then the gradients of x and every parameter)."""
    from fastres.nn import FusedConvBNReLU2d

    if kind not in HOST_KINDS:
        raise ValueError(f"unknown host kind {kind!r}: expected one of {HOST_KINDS}")
    n, c, hw = setup.host_batch
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
    with torch.no_grad():  # non-trivial BN parameters and statistics
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.normal_()
        ref[1].running_mean.normal_()
        ref[1].running_var.uniform_(0.5, 1.5)
    module: nn.Module = ref
    if is_fastres(provider):
        module = copy_weights(FusedConvBNReLU2d(c, c, 3, 1, 1), ref,
                              {"0.weight": "conv.weight", "1.weight": "bn.weight", "1.bias": "bn.bias",
                               "1.running_mean": "bn.running_mean", "1.running_var": "bn.running_var",
                               "1.num_batches_tracked": "bn.num_batches_tracked"})
    module = module.to(setup.device).train(kind != "infer")
    fwd = compiled(module) if is_compiled(provider) else module
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, c, hw, hw, generator=g).to(setup.device)
    dy = torch.randn(n, c, hw, hw, generator=g).to(setup.device)
    if kind != "fwdbwd":
        def forward():
            with torch.no_grad(), provider_context(setup, provider):
                return fwd(x)
        return forward
    x.requires_grad_(True)
    inputs = [x, *module.parameters()]

    def forward_backward():
        with provider_context(setup, provider):
            y = fwd(x)
        return torch.autograd.grad(y, inputs, dy)
    return forward_backward


# ----------------------------------------------------------------------------------------------------
# ResNet-50 conv shapes
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvShape:
    cin: int
    cout: int
    k: int
    stride: int
    pad: int
    h: int
    w: int
    epilogue: str  # "relu" (conv1/conv2, stem), "add_relu" (a block's last conv), "bn" (downsample)

    @property
    def id(self) -> str:
        return f"{self.cin}x{self.h}x{self.w}-{self.cout}k{self.k}s{self.stride}-{self.epilogue}"

    def out_hw(self) -> Tuple[int, int]:
        return ((self.h + 2 * self.pad - self.k) // self.stride + 1,
                (self.w + 2 * self.pad - self.k) // self.stride + 1)


def resnet50_conv_shapes(image: int = 224, width_div: int = 1) -> List[ConvShape]:
    """Every distinct conv of torchvision's ResNet-50 at `image`x`image` input, with the epilogue its
    BN is followed by; channels divided by `width_div` (not the 3 input channels) for tiny runs."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    epilogue = {}
    for m in model.modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            for c in ("conv1", "conv2"):
                epilogue[getattr(m, c)] = "relu"
            epilogue[m.conv3] = "add_relu"
            if m.downsample is not None:
                epilogue[m.downsample[0]] = "bn"
    epilogue[model.conv1] = "relu"
    seen: Dict[ConvShape, None] = {}

    def div(c: int) -> int:
        return c if c == 3 else max(1, c // width_div)

    def hook(mod, inp, _out):
        x = inp[0]
        seen.setdefault(ConvShape(div(mod.in_channels), div(mod.out_channels), mod.kernel_size[0], mod.stride[0],
                                  mod.padding[0], x.shape[2], x.shape[3], epilogue[mod]), None)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image, image))
    for h in hooks:
        h.remove()
    return list(seen)


OP_KINDS = ("train_fwd", "train_fwdbwd", "infer", "bn_act")


def op_cost(kind: str, s: ConvShape, batch: int, elt: int) -> Tuple[int, int]:
    """(bytes, FLOPs) the op must move and compute at least: inputs read once, outputs written once
    (forward+backward: also the gradients read and written; BN statistics need one extra read of z)."""
    ho, wo = s.out_hw()
    nin, nout = batch * s.cin * s.h * s.w, batch * s.cout * ho * wo
    wsz = s.cout * s.cin * s.k * s.k
    flops = 2 * nout * s.cin * s.k * s.k
    res = nout if s.epilogue == "add_relu" else 0
    if kind == "bn_act":  # read z twice (stats, apply), read residual, write y
        return (3 * nout + res) * elt, 0
    if kind == "infer":
        return (nin + wsz + nout + res) * elt, flops
    fwd = nin + wsz + nout + res
    if kind == "train_fwd":
        return fwd * elt, flops
    # backward: read dy, x, w, z (and the saved mask, ignored); write dx, dw (and dres)
    return (fwd + nout + nin + wsz + nout + nin + wsz + res) * elt, 3 * flops


def eager_op(kind: str, x: Tensor, w: Optional[Tensor], bias: Optional[Tensor], gamma: Optional[Tensor],
             beta: Optional[Tensor], rm: Optional[Tensor], rv: Optional[Tensor], res: Optional[Tensor],
             stride: int, pad: int, relu: bool) -> Tensor:
    """The eager PyTorch form of an op case: "train" conv + BN (batch statistics), "infer" conv with BN
    folded into (w, bias), "bn_act" BN alone on x; then (+ res) (+ ReLU)."""
    y = x if kind == "bn_act" else F.conv2d(x, w, bias, stride, pad)
    if kind != "infer":
        y = F.batch_norm(y, rm, rv, gamma, beta, True, 0.1, 1e-5)
    y = y if res is None else y + res
    return F.relu(y) if relu else y


_EAGER_COMPILED: List[Callable] = []


def compiled_eager_op() -> Callable:
    """torch.compile(eager_op), one per process: dynamo specialises it per shape and kind."""
    if not _EAGER_COMPILED:
        _EAGER_COMPILED.append(compiled(eager_op))
    return _EAGER_COMPILED[0]


def make_op(kind: str, s: ConvShape, provider: str, setup: Setup, seed: int = 0,
            fmt: Optional[str] = None) -> Callable[[], object]:
    """A zero-argument callable running one op case for `provider` on fresh random inputs
    (`fmt`: "nchw" or "channels_last"; default channels_last on a GPU, nchw on a CPU)."""
    from fastres.ops import conv_bn_act

    if is_fastres(provider) and is_compiled(provider):
        raise LookupError("no torch.compile form of the fastres op cases (models and blocks have one)")
    dev, mf = setup.device, memory_format(fmt or ("channels_last" if setup.gpu else "nchw"))
    g = torch.Generator(device=dev).manual_seed(seed)  # inputs made on the device: fast for big shapes
    ho, wo = s.out_hw()
    act_dt = torch.float32 if setup.autocast is None else setup.autocast

    def rnd(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=g, device=dev).to(dtype)
        if t.dim() == 4:
            t = t.contiguous(memory_format=mf)
        return t.requires_grad_(grad)

    train = kind in ("train_fwd", "train_fwdbwd")
    need_grad = kind == "train_fwdbwd"
    # master weights fp32 (autocast casts them); activations in the compute dtype
    x = rnd(setup.op_batch, s.cin, s.h, s.w, dtype=act_dt, grad=need_grad)
    w = rnd(s.cout, s.cin, s.k, s.k).mul_((s.cin * s.k * s.k) ** -0.5).requires_grad_(need_grad)
    gamma, beta = rnd(s.cout, grad=need_grad), rnd(s.cout, grad=need_grad)
    rm, rv = rnd(s.cout), torch.rand(s.cout, generator=g, device=dev).add_(0.5)
    res = rnd(setup.op_batch, s.cout, ho, wo, dtype=act_dt, grad=need_grad) if s.epilogue == "add_relu" else None
    relu = s.epilogue != "bn"
    dy = rnd(setup.op_batch, s.cout, ho, wo, dtype=act_dt)
    inputs = [t for t in (x, w, gamma, beta, res) if t is not None]

    if kind == "bn_act":
        z = rnd(setup.op_batch, s.cout, ho, wo, dtype=act_dt)
        if is_fastres(provider):
            name = backend_of(provider)
            if name == "triton":
                from fastres.kernels import batchnorm as impl
            elif name == "cuda":
                from fastres.backends import cuda as impl
            else:
                raise LookupError("the torch backend has no separate BN op (it runs inside conv_bn_act)")

            def fn():
                mean, invstd = impl.bn_stats(z, rm, rv, 0.1, 1e-5)
                return impl.bn_apply(z, mean, invstd, gamma, beta, res, relu, True)[0]
            return fn
        op = compiled_eager_op() if provider == "compile" else eager_op
        return lambda: op("bn_act", z, None, None, gamma, beta, rm, rv, res, 1, 0, relu)

    if kind == "infer":  # eager / compile run the deployed form: BN folded into the conv's weight and bias
        scale = gamma * torch.rsqrt(rv + 1e-5)
        wf, bf = (w * scale[:, None, None, None]).detach(), (beta - rm * scale).detach()
    if is_fastres(provider):
        def run():
            with provider_context(setup, provider):
                return conv_bn_act(x, w, None, gamma, beta, rm, rv, res, stride=s.stride, padding=s.pad,
                                   training=train, relu=relu)
    else:
        op = compiled_eager_op() if provider == "compile" else eager_op
        args = (("infer", x, wf, bf, None, None, None, None) if kind == "infer"
                else ("train", x, w, None, gamma, beta, rm, rv))

        def run():
            with provider_context(setup, provider):
                return op(*args, res, s.stride, s.pad, relu)

    if kind == "infer":
        def no_grad_run():
            with torch.no_grad():
                return run()
        return no_grad_run
    if kind == "train_fwd":
        return run

    def fwdbwd():
        return torch.autograd.grad(run(), inputs, dy)
    return fwdbwd
