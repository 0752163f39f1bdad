"""convert() for timm's ResNet family (timm.models.resnet: ResNet, BasicBlock, Bottleneck).

timm's classes cover resnet18..200, the c/d/s/t stems (conv1 a Sequential of conv-bn-act ending in a
conv whose BN is the model's bn1), avg-down shortcuts (Sequential(AvgPool2d, Conv2d, BatchNorm2d)),
and optional extras inside each block: drop_block, aa (anti-aliasing), se (attention), drop_path and
any activation. The converted subclasses run timm's forward step for step, with each conv -> bn and
what directly follows it fused through :func:`fastres.nn.conv_bn_act_modules`:

* a module that returns its input unchanged is skipped: None, nn.Identity, and timm's DropPath /
  DropBlock2d while they drop nothing (eval mode, or drop_prob 0: their forward returns x itself);
* a plain nn.ReLU straight after the BN (after skipped modules) is fused; any other module after the
  BN (an active DropBlock2d, a BlurPool, another activation) runs as itself, in timm's order;
* the residual add and the last ReLU are fused into the last conv when nothing active (se, an active
  drop_path) sits between that conv's BN and the add; otherwise the last conv -> bn is fused and
  se, drop_path, the shortcut, the add and the activation run as timm runs them.

Under torch.fx tracing, with hooks on any module the fused forward would not call, and for the stem
while gradient checkpointing is on, timm's own forward runs (every module called). timm is optional:
nothing here imports it unless a model holds its classes (or a pickled converted model is loaded).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence, Set

import torch
import torch.nn as nn

from fastres.convert.chains import FusedSequential, chain_at, run_chains
from fastres.convert.report import ConversionReport, join
from fastres.convert.torchvision import patched_method
from fastres.models.pool import max_pool
from fastres.nn import (
    conv_bn_act_modules,
    draws_nothing,
    inner_plain_forward_needed,
    is_plain_relu,
    module_hooked,
    plain_forward_needed,
    unfusable_reason,
)

Tensor = torch.Tensor

__all__ = ["timm_classes", "convert_timm_module", "converted_class", "CLASS_NAMES"]

CLASS_NAMES = ("ConvertedTimmResNet", "ConvertedTimmBasicBlock", "ConvertedTimmBottleneck")
_classes: Dict[str, type] = {}
_SEQUENTIALS = (nn.Sequential, FusedSequential)


def _timm_resnet():
    return sys.modules.get("timm.models.resnet")


def _passes_through(m: Optional[nn.Module]) -> bool:
    """Whether calling m (no hooks) returns its input itself: None, nn.Identity, and timm's DropPath /
    DropBlock2d in eval mode or with drop_prob 0 (their forward: `if not training or not drop_prob:
    return x`)."""
    if m is None or type(m) is nn.Identity:
        return True
    tr = _timm_resnet()
    if tr is not None and type(m) in (tr.DropPath, tr.DropBlock2d):
        return not m.training or not m.drop_prob
    return False


def _conv_bn_then(x: Tensor, conv: nn.Module, bn: nn.Module, after: Sequence[Optional[nn.Module]]) -> Tensor:
    """after[-1](...after[0](bn(conv(x)))): modules that pass their input through are skipped, a plain
    ReLU first in line is fused with conv -> bn, the rest run as themselves in order."""
    rest = [m for m in after if not _passes_through(m)]
    relu = bool(rest) and is_plain_relu(rest[0])
    x = conv_bn_act_modules(x, conv, bn, relu=relu)
    for m in rest[1 if relu else 0:]:
        x = m(x)
    return x


def _shortcut(ds: Optional[nn.Module], x: Tensor) -> Tensor:
    if ds is None:
        return x
    if type(ds) in _SEQUENTIALS:  # nn.Sequential's forward, its conv -> bn pairs fused
        return run_chains(list(ds._modules.values()), x)
    return ds(x)


def _last_stage(block: nn.Module, x: Tensor, shortcut: Tensor, conv: nn.Module, bn: nn.Module,
                act: nn.Module) -> Tensor:
    """timm's block tail: conv, bn, se, drop_path, shortcut = downsample(shortcut), x += shortcut, act."""
    # (the downsample runs before the fused pair only where nothing between draws random numbers:
    # fastres.models.block_forward._last_stage)
    if _passes_through(block.se) and _passes_through(block.drop_path) and is_plain_relu(act) \
            and draws_nothing(conv, bn):
        return conv_bn_act_modules(x, conv, bn, residual=_shortcut(block.downsample, shortcut), relu=True)
    x = _conv_bn_then(x, conv, bn, (block.se, block.drop_path))
    return act(x + _shortcut(block.downsample, shortcut))  # timm adds in place: the same values


def _basic_forward(base: type) -> Callable:
    def forward(self, x: Tensor) -> Tensor:
        if inner_plain_forward_needed(self):
            return base.forward(self, x)
        shortcut = x
        x = _conv_bn_then(x, self.conv1, self.bn1, (self.drop_block, self.act1, self.aa))
        return _last_stage(self, x, shortcut, self.conv2, self.bn2, self.act2)
    return forward


def _bottleneck_forward(base: type) -> Callable:
    def forward(self, x: Tensor) -> Tensor:
        if inner_plain_forward_needed(self):
            return base.forward(self, x)
        shortcut = x
        x = _conv_bn_then(x, self.conv1, self.bn1, (self.act1,))
        x = _conv_bn_then(x, self.conv2, self.bn2, (self.drop_block, self.act2, self.aa))
        return _last_stage(self, x, shortcut, self.conv3, self.bn3, self.act3)
    return forward


def _stem(model: nn.Module, x: Tensor) -> Tensor:
    """act1(bn1(conv1(x))) with conv1 a Conv2d, or a deep stem Sequential(conv, bn, act, ..., conv)."""
    c = model.conv1
    if isinstance(c, nn.Conv2d):
        return _conv_bn_then(x, c, model.bn1, (model.act1,))
    mods = list(c._modules.values()) if type(c) in _SEQUENTIALS else []
    if mods and isinstance(mods[-1], nn.Conv2d):
        return _conv_bn_then(run_chains(mods[:-1], x), mods[-1], model.bn1, (model.act1,))
    return model.act1(model.bn1(c(x)))


def _forward_features(base: type) -> Callable:
    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing or plain_forward_needed(*self.conv1.modules(), self.bn1, self.act1):
            return base.forward_features(self, x)  # (the blocks still run fused)
        x = _stem(self, x)
        x = max_pool(self.maxpool, x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)
    return forward_features


def _build(tr) -> None:
    bodies = {
        "ConvertedTimmResNet": (tr.ResNet, "forward_features", _forward_features),
        "ConvertedTimmBasicBlock": (tr.BasicBlock, "forward", _basic_forward),
        "ConvertedTimmBottleneck": (tr.Bottleneck, "forward", _bottleneck_forward),
    }
    for name, (base, method, make) in bodies.items():
        fn = make(base)
        fn.__qualname__ = f"{name}.{method}"
        doc = f"timm's {base.__name__}, converted by fastres.convert: its {method} runs fused."
        _classes[name] = type(name, (base,), {method: fn, "__module__": "fastres.convert", "__qualname__": name,
                                              "__doc__": doc})


def timm_classes() -> Dict[type, type]:
    """{timm class: converted subclass}; empty when timm.models.resnet is not loaded (then no model
    can hold its classes)."""
    tr = _timm_resnet()
    if tr is None:
        return {}
    if not _classes:
        _build(tr)
    return {cls.__mro__[1]: cls for cls in _classes.values()}


def converted_class(name: str) -> type:
    """The converted timm class called `name` (pickled converted models load again: timm imported on demand)."""
    if name in CLASS_NAMES:
        try:
            import timm.models.resnet  # noqa: F401
        except ImportError:
            raise AttributeError(f"{__name__}.{name} needs timm, which is not installed") from None
        timm_classes()
        return _classes[name]
    raise KeyError(name)


def _extras(m: nn.Module) -> List[str]:
    """The block's modules that run as themselves between the fused ops (at conversion time)."""
    out = [f"{a} ({type(getattr(m, a)).__name__})" for a in ("drop_block", "aa", "se", "drop_path")
           if not _passes_through(getattr(m, a, None))]
    acts = ("act1", "act2", "act3") if hasattr(m, "conv3") else ("act1", "act2")
    out += [f"{a} ({type(getattr(m, a)).__name__})" for a in acts if hasattr(m, a) and not is_plain_relu(getattr(m, a))]
    return out


def convert_timm_module(name: str, m: nn.Module, classes: Dict[type, type], report: ConversionReport,
                        covered: Set[int], handled: Set[int]) -> None:
    """Swap a timm ResNet / BasicBlock / Bottleneck (exactly that class) to its converted subclass,
    or leave it alone when a module inside it has hooks; record what happened in `report`. The ids
    of the convs it accounts for go to `covered`, of the Sequentials its forward runs to `handled`."""
    already = type(m) in classes.values()
    kind = type(m).__mro__[1].__name__ if already else type(m).__name__
    hooked = [n for n, sub in m.named_modules() if n and module_hooked(sub)]
    if hooked and not already:
        report.left_alone.append((name, f"timm {kind}: a hook is registered on {hooked[0]} (the fused "
                                        f"forward would skip it)"))
        return
    patched = None if already else patched_method(
        type(m), ("forward_features",) if isinstance(m, _timm_resnet().ResNet) else ("forward",))
    if patched is not None:
        report.left_alone.append((name, f"timm's {kind}.{patched} is not timm's code (patched): it runs as itself"))
        return
    pairs = [(c, b) for c, b in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
             if hasattr(m, c) and hasattr(m, b)]
    seqs = [("downsample", getattr(m, "downsample", None))]
    if isinstance(m, _timm_resnet().ResNet):
        pairs = [("conv1", "bn1")]
        stem = m.conv1
        if type(stem) in _SEQUENTIALS:
            seqs.append(("conv1", stem))
            last = list(stem._modules.values())[-1:]
            if last and isinstance(last[0], nn.Conv2d):
                covered.add(id(last[0]))
                why = unfusable_reason(last[0], m.bn1)
                if why is not None:
                    report.left_alone.append((join(name, f"conv1.{len(stem) - 1}"),
                                              f"runs unfused inside the fused stem: {why}"))
            pairs = []
        extras = [] if is_plain_relu(m.act1) else [f"act1 ({type(m.act1).__name__})"]
    else:
        extras = _extras(m)
    if already:
        what = f"already fused ({type(m).__name__})"
    else:
        m.__class__ = classes[type(m)]
        what = f"timm {kind} -> {type(m).__name__}"
    if extras:
        what += f" ({', '.join(extras)} run as themselves between the fused ops)"
    report.fused.append((name, what))
    for c, b in pairs:
        conv = getattr(m, c)
        if not isinstance(conv, nn.Conv2d):
            continue
        covered.add(id(conv))
        why = unfusable_reason(conv, getattr(m, b))
        if why is not None:
            report.left_alone.append((join(name, c), f"runs unfused inside the fused module: {why}"))
    for attr, seq in seqs:
        if seq is None or type(seq) not in _SEQUENTIALS:
            continue
        handled.add(id(seq))
        mods, keys = list(seq._modules.values()), list(seq._modules.keys())
        for i, child in enumerate(mods):
            if isinstance(child, nn.Conv2d) and id(child) not in covered:
                covered.add(id(child))
                _, why = chain_at(mods, i)
                if why is not None:
                    report.left_alone.append((join(name, f"{attr}.{keys[i]}"), why))
