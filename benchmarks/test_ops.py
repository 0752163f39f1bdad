"""Op level: the per-op host overhead (one conv3x3 + BN + ReLU on a 2x8x4x4 tensor, FusedConvBNReLU2d vs
nn.Conv2d + nn.BatchNorm2d + nn.ReLU; forward, inference, forward + backward), and on a GPU (or with
FASTRES_BENCH_OP_SHAPES=1) every distinct ResNet-50 conv shape: conv + BN (+ add) (+ ReLU) training forward,
forward + backward, inference with BN folded, and BN + add + ReLU alone (memory-bound: GB/s)."""
import pytest

from fastres.bench.cases import cases
from fastres.bench.config import setup_from_env

CASES = [pytest.param(c, id=c.id) for c in cases(setup_from_env(), "ops")]


@pytest.mark.parametrize("case", CASES)
def test_op(run_case, case):
    run_case(case)
