"""Op level: every distinct ResNet-50 conv shape; conv + BN (+ add) (+ ReLU) training forward, forward +
backward, inference with BN folded; and BN + add + ReLU alone (memory-bound: GB/s)."""
import pytest

from fastres import bench

CASES = [pytest.param(c, id=c.id) for c in bench.cases(bench.setup_from_env(), "ops")]


@pytest.mark.parametrize("case", CASES)
def test_op(run_case, case):
    run_case(case)
