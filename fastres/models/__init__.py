"""The model zoo: ImageNet ResNets (torchvision-compatible names) and the paper's CIFAR-10 nets."""
from fastres.models.cifar import (
    CifarResNet,
    plain20,
    plain32,
    plain44,
    plain56,
    plain110,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet1202,
)
from fastres.models.registry import ModelInfo, get_model, list_models, model_info, register_model
from fastres.models.resnet import (
    BasicBlock,
    Bottleneck,
    FusedResNet,
    FusedResNet18,
    FusedResNet34,
    FusedResNet50,
    FusedResNet101,
    FusedResNet152,
    FusedResNeXt50_32x4d,
    FusedResNeXt101_32x8d,
    FusedWideResNet50_2,
    FusedWideResNet101_2,
    ZeroPadShortcut,
    plain18,
    plain34,
)

for _name, _depth in (("resnet18", 18), ("resnet34", 34), ("resnet50", 50), ("resnet101", 101), ("resnet152", 152)):
    register_model(_name, "imagenet", _depth, "B", torchvision=_name)(globals()[f"FusedResNet{_depth}"])
register_model("plain18", "imagenet", 18, None)(plain18)
register_model("plain34", "imagenet", 34, None)(plain34)
for _depth in (20, 32, 44, 56, 110, 1202):
    register_model(f"resnet{_depth}", "cifar", _depth, "A")(globals()[f"resnet{_depth}"])
for _depth in (20, 32, 44, 56, 110):
    register_model(f"plain{_depth}", "cifar", _depth, None)(globals()[f"plain{_depth}"])
register_model("resnet8", "cifar", 8, "A")(lambda **kw: CifarResNet(8, **{"shortcut": "A", **kw}))  # tiny: tests

__all__ = [
    "ModelInfo", "get_model", "list_models", "model_info", "register_model",
    "BasicBlock", "Bottleneck", "FusedResNet", "ZeroPadShortcut",
    "FusedResNet18", "FusedResNet34", "FusedResNet50", "FusedResNet101", "FusedResNet152",
    "FusedResNeXt50_32x4d", "FusedResNeXt101_32x8d", "FusedWideResNet50_2", "FusedWideResNet101_2",
    "plain18", "plain34",
    "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
    "plain20", "plain32", "plain44", "plain56", "plain110",
]
