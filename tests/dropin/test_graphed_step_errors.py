"""fastres.GraphedStep's errors, on any machine: what it needs is named before anything is captured."""
import pytest
import torch

import fastres


def _model():
    return fastres.resnet8(num_classes=10) if hasattr(fastres, "resnet8") else fastres.resnet20(num_classes=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA GPU")
def test_without_a_gpu_says_so():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        fastres.GraphedStep(m, opt, torch.nn.functional.cross_entropy, torch.randn(2, 3, 32, 32),
                            torch.zeros(2, dtype=torch.long))


def test_unsupported_optimizer_and_cpu_batch_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # reach the argument checks
    m = _model()
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="example_x as a CUDA tensor, got cpu"):
        fastres.GraphedStep(m, torch.optim.SGD(m.parameters(), lr=0.1), torch.nn.functional.cross_entropy, x, y)
    from fastres import graphs

    assert not graphs._fresh_is_zero(torch.optim.RMSprop(m.parameters()))
    assert not graphs._fresh_is_zero(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.5))
    assert graphs._fresh_is_zero(torch.optim.AdamW(m.parameters()))
