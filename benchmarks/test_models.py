"""Model level: ResNet-50 and ResNet-18, training step (forward, backward, SGD step) and inference at
several batch sizes; images/s and peak memory per provider."""
import pytest

from fastres import bench

CASES = [pytest.param(c, id=c.id) for c in bench.cases(bench.setup_from_env(), "models")]


@pytest.mark.parametrize("case", CASES)
def test_model(run_case, case):
    run_case(case)
