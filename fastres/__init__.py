"""fastres: ResNet for PyTorch with fused conv + BatchNorm (+ residual) (+ ReLU) kernels.

    from fastres import FusedResNet50, resnet20, convert, set_backend
"""
from fastres import backend  # noqa: F401  (fastres.backend: the public name of fastres.backends)
from fastres.backends import BackendUnavailableError, get_backend, set_backend, use_backend
from fastres.convert import ConversionReport, UnfuseReport, convert, unfuse  # fastres.convert: the function
from fastres.errors import InputDtypeError, InputShapeError
from fastres.frozen import frozen
from fastres.graphs import AutocastForward, GraphedStep
from fastres.models import *  # noqa: F401,F403  (the model zoo; names in fastres.models.__all__)
from fastres.models import __all__ as _models_all
from fastres.nn import FusedConvBN2d, FusedConvBNReLU2d
from fastres.ops import bn_act, conv_bn_act

__version__ = "0.1.0"

__all__ = ["AutocastForward", "BackendUnavailableError", "GraphedStep", "InputShapeError", "InputDtypeError", "frozen",
           "get_backend", "set_backend", "use_backend", "FusedConvBN2d", "FusedConvBNReLU2d", "conv_bn_act", "bn_act",
           "convert", "ConversionReport", "unfuse", "UnfuseReport", *_models_all]
