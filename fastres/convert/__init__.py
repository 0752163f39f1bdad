"""convert(model): run an existing model's conv -> BN (-> ReLU) chains through the fused op, in place.

Nothing is copied or renamed: modules keep their children, parameters and buffers, so the state_dict
keys never change (a checkpoint saved before conversion loads strictly after it, and the reverse) and
an optimizer built before conversion keeps training the same tensors. convert() changes only the
class of modules whose forward it can prove, to a subclass whose forward calls
:func:`fastres.nn.conv_bn_act_modules`:

* torchvision's ResNet (the stem conv1 -> bn1 -> relu), BasicBlock and Bottleneck (every conv -> bn,
  the residual add and the ReLU; a downsample Sequential(conv, bn) too), exactly those classes: a
  subclass may have its own forward and is left alone.
* timm's ResNet (stem, deep stems), BasicBlock and Bottleneck (fastres/convert/timm.py): every conv ->
  bn fused, extras (se, drop_path, drop_block, aa, other activations) run as themselves in timm's order.
* torchvision's FrozenBatchNorm2d counts as an eval-mode BatchNorm2d everywhere (detection backbones).
* fastres models unfused by :func:`fastres.unfuse` (fastres/convert/unfuse.py) get their fused classes back.
* nn.Sequential (exactly): consecutive (Conv2d, BatchNorm2d[, ReLU]) children (fastres/convert/chains.py).

Left alone, and reported with the reason: convs inside other modules (their forward may use the
conv's output elsewhere), pairs that unfusable_reason() rejects (padding_mode="reflect", a BN with
another number of features ...), modules with forward hooks (the fused op would skip them), subclasses
with their own forward. The report is stored on the model as ``model.fastres_report`` (a plain
attribute, not in the state_dict), logged at INFO on the "fastres" logger, and printed when verbose.
Converting twice is harmless.
"""
from __future__ import annotations

import torch.nn as nn

from fastres.convert import timm as _timm
from fastres.convert import torchvision as _tv
from fastres.convert.chains import FusedSequential, bn_chain_at, chain_at, run_chains
from fastres.convert.report import ConversionReport, UnfuseReport, finish, join
from fastres.convert.timm import convert_timm_module, timm_classes
from fastres.convert.torchvision import pairs_of, resnet_module_reason, torchvision_classes
from fastres.convert.unfuse import refuse_classes, unfuse
from fastres.models import cifar as _cifar
from fastres.models import resnet as _fr
from fastres.nn import FusedConvBN2d, global_hooks, unfusable_reason

__all__ = ["convert", "unfuse", "ConversionReport", "UnfuseReport", "FusedSequential", "run_chains"]

_FASTRES_FUSED = (_fr.FusedResNet, _fr.BasicBlock, _fr.Bottleneck, _cifar.CifarResNet)


def __getattr__(name: str):
    """The converted torchvision and timm classes, by the names pickled converted models carry
    (fastres.convert.ConvertedResNet, fastres.convert.ConvertedTimmBottleneck ...)."""
    for kind in (_tv, _timm):
        if name in kind.CLASS_NAMES:
            try:
                return kind.converted_class(name)
            except (KeyError, ImportError):
                raise AttributeError(f"{__name__}.{name} needs {kind.__name__.rsplit('.', 1)[1]}, which is not "
                                     f"installed") from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        return finish(model, report, verbose)
    tv = torchvision_classes()
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
            why = resnet_module_reason(m)
            if why is not None:
                report.left_alone.append((name, f"torchvision {type(m).__name__}: {why}"))
                covered.update(id(getattr(m, c)) for c, _ in pairs_of(m))
                continue
            m.__class__ = tv[type(m)]
            report.fused.append((name, f"torchvision {type(m).__mro__[1].__name__} -> {type(m).__name__}"))
        elif isinstance(m, tuple(tv)):
            report.left_alone.append((name, f"{type(m).__name__} subclasses torchvision's "
                                            f"{type(m).__mro__[1].__name__} and may have its own forward"))
            continue
        else:
            continue
        for c, b in pairs_of(m):
            conv, bn = getattr(m, c), getattr(m, b)
            covered.add(id(conv))
            why = unfusable_reason(conv, bn)
            if why is not None:
                report.left_alone.append((join(name, c), f"runs unfused inside the fused module: {why}"))
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
        i = 0
        while i < len(mods):   # the walk of run_chains
            n, why = chain_at(mods, i)
            if isinstance(mods[i], nn.Conv2d):
                covered.add(id(mods[i]))
            if not n and bn_chain_at(mods, i):
                n, why = 2, None
            if n:
                chains += 1
                parts = " -> ".join(f"{keys[j]} ({type(mods[j]).__name__})" for j in range(i, i + n))
                report.fused.append((name, parts + (" (bn_act)" if n == 2 and not isinstance(mods[i], nn.Conv2d)
                                                    else "")))
                i += n
                continue
            if why is not None:
                report.left_alone.append((join(name, keys[i]), why))
            i += 1
        if chains and type(m) is nn.Sequential:
            m.__class__ = FusedSequential

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and id(m) not in covered:
            covered.add(id(m))
            report.left_alone.append((name, "convert() cannot prove where this conv's output goes (only "
                                            "nn.Sequential chains and torchvision / timm ResNet modules are fused)"))
    return finish(model, report, verbose)
