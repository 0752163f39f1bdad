"""Block level: Bottleneck (ResNet-50) and BasicBlock (ResNet-18), training step and inference; fastres vs
plain PyTorch with the same weights (and both under torch.compile for a representative block)."""
import pytest

from fastres.bench.cases import cases
from fastres.bench.config import setup_from_env

CASES = [pytest.param(c, id=c.id) for c in cases(setup_from_env(), "blocks")]


@pytest.mark.parametrize("case", CASES)
def test_block(run_case, case):
    run_case(case)
