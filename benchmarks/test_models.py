"""Model level: training step (forward, cross-entropy, backward, SGD step) and inference (eval, no_grad).
On a CPU: ResNet-18 at 64 px batch 16, ResNet-50 at 64 px batch 8, ResNet-20 at 32 px batch 32, NCHW and
channels_last; on a GPU: ResNet-50 and ResNet-18 at 224 px. Each row: fastres vs plain PyTorch (the same
weights), and both under torch.compile; images/s, ratio and peak memory."""
import pytest

from fastres.bench.cases import cases
from fastres.bench.config import setup_from_env

CASES = [pytest.param(c, id=c.id) for c in cases(setup_from_env(), "models")]


@pytest.mark.parametrize("case", CASES)
def test_model(run_case, case):
    run_case(case)
