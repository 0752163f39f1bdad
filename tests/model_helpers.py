"""Helpers shared by the model and convert() tests (the tolerances and the house rule live in numerics.py)."""
from typing import Union

import torch
import torch.nn as nn
from numerics import assert_as_good  # noqa: F401  (the house rule, re-exported for the model tests)

FWD = ("conv_bn_act", "forward", "torch")
BWD = ("conv_bn_act", "backward", "torch")
UNFUSED = ("conv_bn_act", "forward", "unfused")


def randomize_bn(model: nn.Module, seed: Union[int, torch.Generator], branch_scale: float = 1.0) -> None:
    """Random BN affine parameters, running statistics and num_batches_tracked, so that a comparison
    exercises all of them. branch_scale multiplies the weight of each block's last BN (bn2 / bn3), as
    zero_init_residual does in the limit. Gradient tests use 0.2: with unit-scale branches a random
    deep ResNet's train-mode gradient is so ill-conditioned that PyTorch's own fp32 gradient is up to
    30% off fp64 (ResNet-50, batch 2), and no comparison could tell a bug from rounding.

    Model-level gradient tests use fixed seeds: a ReLU input within fp32 rounding of zero can fall
    on the other side of the mask in one fp32 path and not in the other (a tie, not a bug), which
    moves that element's gradient by a whole term; such a draw is rare but real, and the seeds in
    use are known not to produce one."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    last = {id(getattr(b, "bn3", None) or b.bn2) for b in model.modules() if hasattr(b, "conv2")}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                scale = branch_scale if id(m) in last else 1.0
                m.weight.copy_((torch.rand(c, generator=gen) + 0.5) * scale)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=gen)))


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())

