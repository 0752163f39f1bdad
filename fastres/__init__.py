"""fastres: ResNet for PyTorch with fused conv + BatchNorm (+ residual) (+ ReLU) kernels."""
from fastres.backend import BackendUnavailableError, get_backend, set_backend, use_backend
from fastres.nn import FusedConvBN2d, FusedConvBNReLU2d
from fastres.ops import conv_bn_act

__version__ = "0.1.0"
