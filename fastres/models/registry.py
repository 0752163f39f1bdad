"""The model registry: one table of every net fastres builds, read by the trainer, parity, bench and
the tests (the way timm's and torchvision's registries work).

    fastres.models.list_models()              # ['plain110', 'plain18', ..., 'resnet20', ...]
    fastres.models.list_models("cifar")       # the paper's CIFAR-10 nets (section 4.2)
    fastres.models.get_model("resnet50", num_classes=10)
    fastres.models.model_info("resnet20")     # ModelInfo(name, family, depth, shortcut, torchvision, builder)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch.nn as nn

__all__ = ["ModelInfo", "register_model", "get_model", "list_models", "model_info"]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    family: str                        # "imagenet" (224 px, 1000 classes) or "cifar" (32 px, 10 classes)
    depth: int
    shortcut: Optional[str]            # the paper's option the net uses by default (None: plain net)
    torchvision: Optional[str] = None  # torchvision's builder of the same net, where there is one


_REGISTRY: Dict[str, ModelInfo] = {}


def register_model(name: str, family: str, depth: int, shortcut: Optional[str], torchvision: Optional[str] = None):
    """Decorator (or call on a builder) adding `name` to the registry."""
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered already")
        _REGISTRY[name] = ModelInfo(name, builder, family, depth, shortcut, torchvision)
        return builder
    return add


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(list_models())}") from None


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the registered net `name` (keyword arguments go to its builder: num_classes, shortcut ...)."""
    return model_info(name).builder(**kwargs)


def list_models(family: Optional[str] = None, ordered: bool = True) -> List[str]:
    """The registered names (of one family: "imagenet" or "cifar"), sorted, or in registration order."""
    names = [n for n, info in _REGISTRY.items() if family is None or info.family == family]
    return sorted(names) if ordered else names
