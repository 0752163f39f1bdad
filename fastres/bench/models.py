"""Block- and model-level benchmark cases: one training step (forward, loss, backward, SGD step) or one
inference call (eval mode, no_grad) of a whole model or of one residual block.

fastres' models (FusedResNet18/50, resnet20) get the plain-PyTorch model's weights copied in with a strict
load_state_dict, so that both providers of a comparison run the same math on the same inputs:
torchvision's ResNet-18 / ResNet-50, and for ResNet-20 (which torchvision lacks) the plain-PyTorch CIFAR
twin fastres.parity.CifarReference.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.bench.baselines import EVAL_ONLY, FREEZING, ORT, FreezingCall, OnnxRuntimeCall
from fastres.bench.config import (
    Setup,
    backend_of,
    compiled,
    copy_weights,
    is_compiled,
    is_fastres,
    is_graphed,
    memory_format,
    provider_context,
)
from fastres.models.registry import get_model, model_info

Tensor = torch.Tensor

BLOCKS = {  # name -> (arch, layer path, input channels, input size divisor of the image)
    "bottleneck-layer1.0": ("resnet50", "layer1.0", 64, 4),
    "bottleneck-layer3.1": ("resnet50", "layer3.1", 1024, 16),
    "basic-layer1.0": ("resnet18", "layer1.0", 64, 4),
    "basic-layer2.0": ("resnet18", "layer2.0", 64, 4),
}
def num_classes(arch: str) -> int:
    return 10 if model_info(arch).family == "cifar" else 1000


def build_model(arch: str, provider: str, seed: int = 0) -> nn.Module:
    """The plain-PyTorch model (eager, compile, onnxruntime, compile+freezing) or fastres' (fastres-*), with the
    same weights."""
    info = model_info(arch)   # ValueError naming the registered nets for an unknown arch
    torch.manual_seed(seed)
    if info.family == "cifar":
        from fastres.parity import CifarReference

        ref: nn.Module = CifarReference(info.depth, num_classes(arch), info.shortcut)
    elif info.torchvision is not None:
        import torchvision

        ref = getattr(torchvision.models, info.torchvision)(weights=None, num_classes=num_classes(arch))
    else:
        raise ValueError(f"{arch!r} has no plain-PyTorch twin to benchmark against")
    if not is_fastres(provider):
        return ref
    return copy_weights(get_model(arch, num_classes=num_classes(arch)), ref)


def _submodule(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


class Step:
    """One training step of `module` (forward, loss, backward, SGD step) or one inference call; the inference
    baselines onnxruntime and compile+freezing (fastres/bench/baselines.py) are built here, once."""

    def __init__(self, module: nn.Module, x: Tensor, target: Optional[Tensor], setup: Setup, provider: str,
                 mode: str, fmt: str):
        if mode not in ("train", "infer"):
            raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
        if provider in EVAL_ONLY and mode != "infer":
            raise LookupError(f"{provider} is an inference baseline: eval rows only")
        self.setup, self.provider, self.mode = setup, provider, mode
        self.call = None
        if provider == ORT:   # the NCHW model and input, whatever `fmt`: ONNX has one layout
            self.call = OnnxRuntimeCall(module.to(setup.device), x.to(setup.device))
        mf = memory_format(fmt)
        self.module = module.to(setup.device, memory_format=mf).train(mode == "train")
        self.fwd = compiled(self.module) if is_compiled(provider) else self.module
        self.x = x.to(setup.device).contiguous(memory_format=mf)
        self.target = None if target is None else target.to(setup.device)
        self.opt = (torch.optim.SGD(self.module.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
                    if mode == "train" else None)
        self.frozen = None
        if provider.endswith("+frozen") and mode == "infer":   # fastres.frozen for the Step's life
            import fastres

            self.frozen = fastres.frozen(self.module).__enter__()
            self._settle_plan()
        if provider == FREEZING:
            self.call = FreezingCall(self.module, self.x)
        if is_graphed(provider):
            self.call = self._graphed()

    def _settle_plan(self, limit_s: float = 10.0) -> None:
        """Calls until the frozen model runs its compiled plan (fastres.models.plan), as a serving loop soon
        does (at most `limit_s`; a model without one times its per-layer path): the rows time that state,
        as compile rows time compiled code. What it took goes to the log, not into a row."""
        from fastres.models import plan

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit_s and not plan.live(self.module) and plan.builds < plan.MAX_BUILDS:
            self()
        logging.getLogger("fastres.bench").info("%s: frozen plan %s after %.2f s", self.provider,
                                                "live" if plan.live(self.module) else "not built",
                                                time.perf_counter() - t0)

    def _graphed(self):
        """The training step captured once (warm-up and capture inside the provider's backend), replayed."""
        from fastres.graphs import AutocastForward, GraphedStep

        if self.mode != "train" or self.target is None:
            raise LookupError(f"{self.provider}: CUDA graphs of a model's training step only")
        import fastres

        fwd = AutocastForward(self.module, self.setup.autocast) if self.setup.autocast is not None else self.module
        backend = backend_of(self.provider) if is_fastres(self.provider) else "torch"
        with fastres.use_backend(backend):   # (autocast inside AutocastForward, its weight cache off)
            step = GraphedStep(fwd, self.opt, lambda out, y: F.cross_entropy(out.float(), y), self.x, self.target)
        return lambda: step(self.x, self.target)

    def __call__(self):
        if self.call is not None:
            return self.call()
        if self.mode != "train":
            with torch.no_grad(), provider_context(self.setup, self.provider):
                return self.fwd(self.x)
        self.opt.zero_grad(set_to_none=True)
        with provider_context(self.setup, self.provider):
            out = self.fwd(self.x)
        if self.target is None:  # a block: a loss that touches every output element
            loss = out.float().square().mean()
        else:
            loss = F.cross_entropy(out.float(), self.target)
        loss.backward()
        self.opt.step()
        return loss


def make_block(name: str, mode: str, provider: str, setup: Setup, fmt: Optional[str] = None, seed: int = 0) -> Step:
    arch, path, cin, div = BLOCKS[name]
    block = copy.deepcopy(_submodule(build_model(arch, provider, seed=seed), path))
    g = torch.Generator().manual_seed(seed)
    hw = setup.block_image // div
    x = torch.randn(setup.block_batch, cin, hw, hw, generator=g)
    if setup.autocast is not None:  # inside a network a block's input is the previous block's output
        x = x.to(setup.autocast)
    return Step(block, x, None, setup, provider, mode, fmt or setup.block_formats[0])


def make_model(arch: str, mode: str, batch: int, provider: str, setup: Setup, image: Optional[int] = None,
               fmt: Optional[str] = None, seed: int = 0) -> Step:
    spec = setup.model(arch, image)
    image = image or (spec.image if spec else 224)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image, image, generator=g)
    target = torch.randint(0, num_classes(arch), (batch,), generator=g)
    return Step(build_model(arch, provider, seed=seed), x, target, setup, provider, mode,
                fmt or (spec.formats[0] if spec else "nchw"))
