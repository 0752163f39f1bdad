"""The backend contract as code: what every backend module of fastres.backends provides, as a typing
Protocol (checked against every registered backend by tests/backends/test_contract.py). The meaning of
each argument and output is written in fastres/backends/__init__.py; the math in fastres/ops/reference.py.
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
Reason = Union[None, str, Sequence[str]]   # supports(): None (or empty) when the kernels cover the call

__all__ = ["Backend", "Reason"]


class Backend(Protocol):
    NAME: str
    DEVICES: Tuple[str, ...]
    DTYPES: Tuple[torch.dtype, ...]
    OPS: Tuple[str, ...]

    def available(self) -> Tuple[bool, str]: ...

    def device_reason(self, device: torch.device) -> Optional[str]: ...

    # conv_bn_act
    def conv_bn_act_supports(self, x: Tensor, weight: Tensor, residual: Optional[Tensor], stride, padding, dilation,
                             groups: int, training: bool, relu: bool) -> Reason: ...

    def conv_bn_act_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                            bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            residual: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                            groups: int, training: bool, momentum: float, eps: float, relu: bool, save_mask: bool
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...

    def conv_bn_act_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor,
                             mask: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                             stride: List[int], padding: List[int], dilation: List[int], groups: int,
                             training: bool, relu: bool, needs: List[bool]
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]: ...

    # bn_act
    def bn_act_supports(self, x: Tensor, residual: Optional[Tensor], training: bool, relu: bool) -> Reason: ...

    def bn_act_forward(self, x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor], residual: Optional[Tensor],
                       training: bool, momentum: float, eps: float, relu: bool, save_mask: bool
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def bn_act_backward(self, grad_y: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                        bn_weight: Optional[Tensor], training: bool, relu: bool, needs: List[bool]
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]: ...
