"""What the paper measures inside a trained net: layer responses (Fig. 7) and per-layer gradient norms.

A *response* is the output of a 3x3 layer after BatchNorm and before the residual addition and the
ReLU. fastres runs conv + BN (+ add) (+ ReLU) as one fused op that never materialises that tensor
(and calls the conv and BN modules' weights directly, so hooks on those modules do not fire). So the
responses are computed explicitly: a forward pre-hook on the model catches the stem's input and one on
each residual block catches the block's input; from it the hook evaluates the block's 3x3 layers with
the block's own nn.Conv2d and nn.BatchNorm2d modules, unfused: ``bn1(conv1(x))``, then
``bn2(conv2(relu(bn1(conv1(x)))))`` for a BasicBlock. That needs eval mode (BN with its running
statistics, nothing updated). tests/train/test_experiments.py checks it against a manual forward.

3x3 layers, counted from the input (layer 1 is the stem's conv when it is 3x3, as in the CIFAR nets):
the stem, then in each BasicBlock conv1 and conv2, in each Bottleneck its 3x3 conv2.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.models.resnet import BasicBlock, Bottleneck

Tensor = torch.Tensor

__all__ = ["layers_3x3", "capture_responses", "response_stds", "grad_norms"]


def _is_3x3(conv) -> bool:
    return isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (3, 3)


def layers_3x3(model: nn.Module) -> List[Tuple[str, nn.Conv2d, nn.Module]]:
    """(name, conv, bn) of every 3x3 layer of a fastres ResNet or plain net, from the input on."""
    layers = []
    if _is_3x3(getattr(model, "conv1", None)) and isinstance(getattr(model, "bn1", None), nn.Module):
        layers.append(("conv1", model.conv1, model.bn1))
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            layers += [(f"{name}.conv1", m.conv1, m.bn1), (f"{name}.conv2", m.conv2, m.bn2)]
        elif isinstance(m, Bottleneck) and _is_3x3(m.conv2):
            layers.append((f"{name}.conv2", m.conv2, m.bn2))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no 3x3 conv + BN layers this probe knows "
                         "(a fastres ResNet or plain net with BasicBlock or Bottleneck blocks)")
    return layers


def _block_responses(block: nn.Module, x: Tensor) -> List[Tensor]:
    """The 3x3 layers' responses of one block, from the block's input x."""
    first = block.bn1(block.conv1(x))
    if isinstance(block, BasicBlock):
        return [first, block.bn2(block.conv2(F.relu(first)))]
    return [block.bn2(block.conv2(F.relu(first)))]  # Bottleneck: conv1 is 1x1, conv2 the 3x3


@contextmanager
def _probe(model: nn.Module, on_response: Callable[[int, Tensor], None]) -> Iterator[int]:
    """While active, every forward of `model` calls on_response(layer_index, response) for each 3x3
    layer (index from 0). Yields the number of 3x3 layers."""
    if model.training:
        raise ValueError("responses are measured in eval mode (BN with running statistics): call model.eval()")
    layers = layers_3x3(model)
    handles, index = [], 0
    if layers[0][0] == "conv1":
        stem_conv, stem_bn = layers[0][1], layers[0][2]
        handles.append(model.register_forward_pre_hook(
            lambda _m, args: on_response(0, stem_bn(stem_conv(args[0])))))
        index = 1
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)) and (isinstance(m, BasicBlock) or _is_3x3(m.conv2)):
            def hook(block, args, first=index):
                for k, r in enumerate(_block_responses(block, args[0])):
                    on_response(first + k, r)
            handles.append(m.register_forward_pre_hook(hook))
            index += 2 if isinstance(m, BasicBlock) else 1
    assert index == len(layers), (index, len(layers))
    try:
        yield len(layers)
    finally:
        for h in handles:
            h.remove()


def capture_responses(model: nn.Module, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
    """(model(x), the response of every 3x3 layer on x), in eval mode, without gradients."""
    got = {}
    with torch.no_grad(), _probe(model, lambda i, r: got.__setitem__(i, r.clone())) as n:
        out = model(x)
    assert sorted(got) == list(range(n)), sorted(got)
    return out, [got[i] for i in range(n)]


def response_stds(model: nn.Module, batches: Iterable[Tensor], device: Optional[torch.device] = None) -> List[float]:
    """The standard deviation of each 3x3 layer's response over all its values (images, channels and
    positions) on `batches` of images (sums in float64; the n-1 denominator)."""
    sums: dict = {}

    def add(i: int, r: Tensor) -> None:
        r = r.detach().double()
        n, s, ss = sums.get(i, (0, 0.0, 0.0))
        sums[i] = (n + r.numel(), s + r.sum().item(), ss + (r * r).sum().item())

    with torch.no_grad(), _probe(model, add) as layers:
        for x in batches:
            model(x if device is None else x.to(device))
    stds = []
    for i in range(layers):
        n, s, ss = sums[i]
        stds.append(math.sqrt(max(ss - s * s / n, 0.0) / max(n - 1, 1)))
    return stds


def grad_norms(model: nn.Module, x: Tensor, y: Tensor) -> List[float]:
    """||dL/dW|| of every 3x3 layer's conv weight for the mean cross-entropy L of one batch, in train
    mode (BN normalising with the batch's statistics, as in training). Runs on a copy: the model's
    running statistics and gradients are left as they were."""
    net = copy.deepcopy(model).train()
    net.zero_grad(set_to_none=True)
    out = net(x)
    F.cross_entropy(out.to(torch.promote_types(out.dtype, torch.float32)), y).backward()
    return [conv.weight.grad.norm().item() for _, conv, _ in layers_3x3(net)]
