"""The exceptions fastres raises for a bad call, typed as PyTorch's own layers would raise them.

A torchvision ResNet reports a wrong channel count, shape or dtype with a RuntimeError (from aten's
convolution); fastres says more precisely what was expected, and its errors derive from RuntimeError
too, so code written against torchvision keeps catching them. They also derive from ValueError /
TypeError, which is what the message describes. (BatchNorm's own ValueErrors, "expected 4D input" and
"Expected more than 1 value per channel when training", stay plain ValueErrors, as nn.BatchNorm2d
raises them.)
"""
from __future__ import annotations

__all__ = ["InputShapeError", "InputDtypeError", "dtype_error"]


class InputShapeError(RuntimeError, ValueError):
    """A tensor of the wrong rank, channel count or shape (aten raises RuntimeError for these)."""


class InputDtypeError(RuntimeError, TypeError):
    """A tensor of the wrong dtype (aten raises RuntimeError for these)."""


class _InputDtypeNotImplemented(InputDtypeError, NotImplementedError):
    """A dtype aten has no convolution kernel for (bool): aten raises NotImplementedError there."""


def dtype_error(message: str, dtype) -> InputDtypeError:
    """The InputDtypeError for an input of `dtype`, typed as aten's convolution would raise it: also a
    NotImplementedError for bool (aten: '"slow_conv2d_cpu" not implemented for 'Bool''), a plain
    RuntimeError subclass otherwise."""
    import torch
    return (_InputDtypeNotImplemented if dtype is torch.bool else InputDtypeError)(message)
