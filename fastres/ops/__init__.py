"""The fused ops, one file each: torch.library custom op + fake + autograd + backend dispatch.

The backends' implementations live in fastres/backends/ (torch.py, triton.py over kernels/, cuda.py
over csrc/); the oracle they are all tested against is fastres/ops/reference.py.
"""
from fastres.ops.bn_act import bn_act
from fastres.ops.conv_bn_act import conv_bn_act

__all__ = ["conv_bn_act", "bn_act"]
