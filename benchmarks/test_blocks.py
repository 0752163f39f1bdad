"""Block level: Bottleneck (ResNet-50) and BasicBlock (ResNet-18), training step and inference."""
import pytest

from fastres import bench

CASES = [pytest.param(c, id=c.id) for c in bench.cases(bench.setup_from_env(), "blocks")]


@pytest.mark.parametrize("case", CASES)
def test_block(run_case, case):
    run_case(case)
