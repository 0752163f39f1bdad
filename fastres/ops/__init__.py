"""The fused ops, one file each: torch.library custom op + fake + autograd + backend dispatch.

The backends' implementations: fastres/ops/reference.py (torch), kernels/<op>.py (triton, installed
as fastres.kernels), fastres/ops/cuda_impl.py over csrc/ (cuda).
"""
from fastres.ops.conv_bn_act import conv_bn_act

__all__ = ["conv_bn_act"]
