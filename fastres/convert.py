"""convert(model): run an existing model's conv -> BN (-> ReLU) chains through the fused op, in place.

Nothing is copied or renamed: modules keep their children, parameters and buffers, so the state_dict
keys never change (a checkpoint saved before conversion loads strictly after it, and the reverse) and
an optimizer built before conversion keeps training the same tensors. convert() changes only the
class of modules whose forward it can prove, to a subclass whose forward calls
:func:`fastres.nn.conv_bn_act_modules`:

* torchvision's ResNet (the stem conv1 -> bn1 -> relu), BasicBlock and Bottleneck (every conv -> bn,
  the residual add and the ReLU; a downsample Sequential(conv, bn) too), exactly those classes: a
  subclass may have its own forward and is left alone.
* timm's ResNet (stem, deep stems), BasicBlock and Bottleneck (fastres/convert_timm.py): every conv ->
  bn fused, extras (se, drop_path, drop_block, aa, other activations) run as themselves in timm's order.
* torchvision's FrozenBatchNorm2d counts as an eval-mode BatchNorm2d everywhere (detection backbones).
* fastres models unfused by :func:`fastres.unfuse.unfuse` get their fused classes back.
* nn.Sequential (exactly): its forward passes each child's output only to the next child, so
  consecutive (Conv2d, BatchNorm2d[, ReLU]) children are a provable chain. The fused Sequential finds
  its children by name at every call, so SyncBatchNorm conversion, ``.to()`` and replaced children
  keep working (a replaced child that no longer forms a chain simply runs on its own).

Left alone, and reported with the reason: convs inside other modules (their forward may use the
conv's output elsewhere), pairs that unfusable_reason() rejects (padding_mode="reflect", a BN with
another number of features ...), modules with forward hooks (the fused op would skip them), subclasses
with their own forward. The report is stored on the model as ``model.fastres_report`` (a plain
attribute, not in the state_dict), logged at INFO on the "fastres" logger, and printed when verbose.
Converting twice is harmless.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from fastres.models import cifar as _cifar
from fastres.models import resnet as _fr
from fastres.nn import (
    FusedConvBN2d,
    conv_bn_act_modules,
    global_hooks,
    is_frozen_bn,
    is_plain_relu,
    module_hooked,
    unfusable_reason,
)

__all__ = ["convert", "ConversionReport", "FusedSequential", "run_chains"]

log = logging.getLogger("fastres")


@dataclasses.dataclass
class ConversionReport:
    """What convert() fused (module name, what) and what it left alone (module name, why)."""

    fused: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    left_alone: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastres.convert: fused {len(self.fused)}, left alone {len(self.left_alone)}"]
        lines += [f"  fused       {name or '<model>'}: {what}" for name, what in self.fused]
        lines += [f"  left alone  {name or '<model>'}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


def _pair_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why (conv, bn) cannot run as one fused op with exactly their own semantics, or None."""
    why = unfusable_reason(conv, bn)
    if why is not None:
        return why
    if module_hooked(conv) or module_hooked(bn):
        return "a hook is registered on the conv or the BatchNorm (the fused op would skip it)"
    return None


def chain_at(mods: List[nn.Module], i: int) -> Tuple[int, Optional[str]]:
    """(length of the fusable chain starting at mods[i]: 0, 2 (conv, bn) or 3 (conv, bn, relu),
    why mods[i], a Conv2d, starts no chain (None when it does, or when mods[i] is no Conv2d))."""
    if not isinstance(mods[i], nn.Conv2d):
        return 0, None
    if i + 1 >= len(mods):
        return 0, "the conv is the Sequential's last child: its output leaves the Sequential"
    nxt = mods[i + 1]
    if not isinstance(nxt, nn.modules.batchnorm._NormBase) and not is_frozen_bn(nxt):
        return 0, f"the conv is followed by {type(nxt).__name__}, not a BatchNorm2d"
    why = _pair_reason(mods[i], nxt)
    if why is not None:
        return 0, why
    return (3 if i + 2 < len(mods) and is_plain_relu(mods[i + 2]) else 2), None


class FusedSequential(nn.Sequential):
    """nn.Sequential whose (Conv2d, BatchNorm2d[, ReLU]) runs of children run as one fused op.

    The chains are found at call time from the current children, so the module stays an honest
    Sequential after children are replaced (SyncBatchNorm conversion) or appended."""

    def forward(self, input):
        return run_chains(list(self._modules.values()), input)


def run_chains(mods: List[nn.Module], x):
    """nn.Sequential's forward over `mods` (each output goes only to the next module), with every
    (Conv2d, BatchNorm2d[, ReLU]) run that chain_at() accepts run as one fused op."""
    i = 0
    while i < len(mods):
        n, _ = chain_at(mods, i)
        if n:
            x = conv_bn_act_modules(x, mods[i], mods[i + 1], relu=n == 3)
            i += n
        else:
            x = mods[i](x)
            i += 1
    return x


# Fused subclasses of torchvision's classes, made on first use (torchvision is optional). They are
# attributes of this module (module __getattr__), so pickled converted models load again.
_TV_NAMES = ("ConvertedResNet", "ConvertedBasicBlock", "ConvertedBottleneck")
_tv_classes: Dict[str, type] = {}


def _torchvision_classes() -> Dict[type, type]:
    """{torchvision class: fused subclass}, empty when torchvision is not installed."""
    try:
        import torchvision.models.resnet as tv
    except ImportError:
        return {}
    if not _tv_classes:
        bodies = {
            "ConvertedResNet": (tv.ResNet, {"_forward_impl": _fr.resnet_forward}),
            "ConvertedBasicBlock": (tv.BasicBlock, {"forward": _fr.basic_block_forward}),
            "ConvertedBottleneck": (tv.Bottleneck, {"forward": _fr.bottleneck_forward}),
        }
        for name, (base, body) in bodies.items():
            doc = f"torchvision's {base.__name__}, converted by fastres.convert: its forward runs fused."
            cls = type(name, (base,), {**body, "__module__": __name__, "__qualname__": name, "__doc__": doc})
            _tv_classes[name] = cls
    return {cls.__mro__[1]: cls for cls in _tv_classes.values()}


def __getattr__(name: str):
    if name in _TV_NAMES and _torchvision_classes():
        return _tv_classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FASTRES_FUSED = (_fr.FusedResNet, _fr.BasicBlock, _fr.Bottleneck, _cifar.CifarResNet)


def _pairs_of(m: nn.Module) -> List[Tuple[str, str]]:
    """The (conv, bn) attribute pairs a ResNet module's fused forward runs."""
    names = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    return [(c, b) for c, b in names if hasattr(m, c) and hasattr(m, b)]


def _resnet_module_reason(m: nn.Module) -> Optional[str]:
    """Why a torchvision ResNet / block cannot take the fused forward (hooks the fused forward would
    skip, or a replaced ReLU), or None."""
    if not is_plain_relu(m.relu):
        return f"its relu is {type(m.relu).__name__} (or has hooks), not a plain nn.ReLU"
    pairs = [(getattr(m, c), getattr(m, b)) for c, b in _pairs_of(m)]
    ds = getattr(m, "downsample", None)
    if ds is not None and type(ds) is nn.Sequential and len(ds) == 2:
        pairs.append((ds[0], ds[1]))
    for conv, bn in pairs:
        if unfusable_reason(conv, bn) is None:  # (pairs it rejects run as the two modules: exact)
            why = _pair_reason(conv, bn)
            if why is not None:
                return why
    return None


def convert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Fuse, in place, every conv -> BN (-> ReLU) chain of `model` that can be proven fusable.

    Returns `model` (same object, same state_dict keys); the ConversionReport is stored as
    ``model.fastres_report``, logged on the "fastres" logger and printed when `verbose`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    if global_hooks():
        report.left_alone.append(("", "global module hooks are registered (the fused op would skip them)"))
        return _finish(model, report, verbose)
    from fastres.convert_timm import convert_timm_module, timm_classes  # (they import this module)
    from fastres.unfuse import refuse_classes

    tv = _torchvision_classes()
    timm = timm_classes()
    plain = refuse_classes()
    converted = tuple(tv.values()) + tuple(timm.values())
    covered = set()  # ids of convs accounted for in the report
    handled_ds = set()  # ids of downsample Sequentials a fused block runs itself

    for name, m in model.named_modules():
        if type(m) in plain:  # a fastres model unfused by fastres.unfuse: its fused class again
            old = type(m).__name__
            m.__class__ = plain[type(m)]
            report.fused.append((name, f"fastres {old} -> {type(m).__name__}"))
            if isinstance(m, FusedConvBN2d):
                covered.add(id(m.conv))
                continue
        elif isinstance(m, FusedConvBN2d):
            covered.add(id(m.conv))
            report.fused.append((name, "already fused (FusedConvBN2d)"))
            continue
        elif type(m) in timm or type(m) in timm.values():
            convert_timm_module(name, m, timm, report, covered, handled_ds)
            continue
        elif isinstance(m, _FASTRES_FUSED) or isinstance(m, converted):
            report.fused.append((name, f"already fused ({type(m).__name__})"))
        elif isinstance(m, tuple(timm)):
            report.left_alone.append((name, f"{type(m).__name__} subclasses timm's "
                                            f"{type(m).__mro__[1].__name__} and may have its own forward"))
            continue
        elif type(m) in tv:
            why = _resnet_module_reason(m)
            if why is not None:
                report.left_alone.append((name, f"torchvision {type(m).__name__}: {why}"))
                covered.update(id(getattr(m, c)) for c, _ in _pairs_of(m))
                continue
            m.__class__ = tv[type(m)]
            report.fused.append((name, f"torchvision {type(m).__mro__[1].__name__} -> {type(m).__name__}"))
        elif isinstance(m, tuple(tv)):
            report.left_alone.append((name, f"{type(m).__name__} subclasses torchvision's "
                                            f"{type(m).__mro__[1].__name__} and may have its own forward"))
            continue
        else:
            continue
        for c, b in _pairs_of(m):
            conv, bn = getattr(m, c), getattr(m, b)
            covered.add(id(conv))
            why = unfusable_reason(conv, bn)
            if why is not None:
                report.left_alone.append((_join(name, c), f"runs unfused inside the fused module: {why}"))
        ds = getattr(m, "downsample", None)
        if ds is not None and type(ds) is nn.Sequential:
            handled_ds.add(id(ds))
            covered.update(id(c) for c in ds)

    for name, m in model.named_modules():
        if id(m) in handled_ds or not isinstance(m, nn.Sequential):
            continue
        if type(m) not in (nn.Sequential, FusedSequential):
            covered.update(id(c) for c in m.children() if isinstance(c, nn.Conv2d))
            if any(isinstance(c, nn.Conv2d) for c in m.children()):
                report.left_alone.append((name, f"{type(m).__name__} subclasses nn.Sequential and may "
                                                f"have its own forward"))
            continue
        mods, keys = list(m._modules.values()), list(m._modules.keys())
        chains = 0
        for i, child in enumerate(mods):
            n, why = chain_at(mods, i)
            if isinstance(child, nn.Conv2d):
                covered.add(id(child))
            if n:
                chains += 1
                parts = " -> ".join(f"{keys[j]} ({type(mods[j]).__name__})" for j in range(i, i + n))
                report.fused.append((name, parts))
            elif why is not None:
                report.left_alone.append((_join(name, keys[i]), why))
        if chains and type(m) is nn.Sequential:
            m.__class__ = FusedSequential

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and id(m) not in covered:
            covered.add(id(m))
            report.left_alone.append((name, "convert() cannot prove where this conv's output goes (only "
                                            "nn.Sequential chains and torchvision / timm ResNet modules are fused)"))
    return _finish(model, report, verbose)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _finish(model: nn.Module, report: ConversionReport, verbose: bool) -> nn.Module:
    object.__setattr__(model, "fastres_report", report)
    log.info("%s", report)
    if verbose:
        print(report)
    return model
