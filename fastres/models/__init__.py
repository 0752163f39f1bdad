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

__all__ = [
    "BasicBlock", "Bottleneck", "FusedResNet", "ZeroPadShortcut",
    "FusedResNet18", "FusedResNet34", "FusedResNet50", "FusedResNet101", "FusedResNet152",
    "FusedResNeXt50_32x4d", "FusedResNeXt101_32x8d", "FusedWideResNet50_2", "FusedWideResNet101_2",
    "plain18", "plain34",
    "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
    "plain20", "plain32", "plain44", "plain56", "plain110",
]
