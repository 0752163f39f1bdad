"""The "torch" backend of conv_bn_act: plain PyTorch (the CPU path, and auto's choice on CUDA until a
GPU run has verified the fused kernels). The contract is in fastres/backends/__init__.py.
"""
from __future__ import annotations

from fastres.ops.reference import conv_bn_act_backward, conv_bn_act_forward

__all__ = ["conv_bn_act_forward", "conv_bn_act_backward", "conv_bn_act_supports"]


def conv_bn_act_supports(x, weight, residual, stride, padding, dilation, groups, training, relu):
    """The torch backend runs every call."""
    return None
