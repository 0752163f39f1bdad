"""The CUDA-graph benchmark rows (issue 21): on a GPU every fastres backend's training step replayed from
one CUDA graph (fastres.GraphedStep) against torchvision's step captured the same way; skipped, with the
reason, everywhere else."""
import pytest
import torch
from numerics import TOL

from fastres.bench.cases import cases
from fastres.bench.config import GRAPHS, is_graphed, make_setup
from fastres.bench.models import make_model


def test_gpu_setup_pairs_each_backend_with_captured_torchvision():
    s = make_setup("cuda")   # (a CPU machine builds it too: its backends are those available here)
    graphed = [c for c in cases(s, "models") if is_graphed(c.provider)]
    assert graphed and all(c.baseline == GRAPHS for c in graphed)
    for c in graphed:
        why = c.skip_reason(s)
        if " train " in f" {c.name} ":
            assert why is None, c.name
        else:
            assert "training rows on a GPU only" in why, c.name


def test_cpu_setup_skips_a_graphs_row_with_the_reason():
    s = make_setup("cpu")
    assert not any(is_graphed(p) for pair in s.pairs for p in pair)   # not offered on a CPU
    s.pairs = [("fastres-torch+graphs", GRAPHS)]
    rows = cases(s, "models", ["resnet20"])
    assert rows and all("on a GPU only" in c.skip_reason(s) for c in rows)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["fastres-torch+graphs", GRAPHS])
def test_graphed_step_replays_the_eager_step(provider):
    """The row's plumbing: three replayed steps of ResNet-18 (bf16 autocast, as the GPU rows run) give the
    eager step's losses from the same weights, within twice bf16's typical relative error (tests/numerics.py)."""
    s = make_setup("cuda")
    eager = make_model("resnet18", "train", 8, provider.replace("+graphs", "") if provider != GRAPHS else "eager",
                       s, image=64)
    graphed = make_model("resnet18", "train", 8, provider, s, image=64)
    want = [float(eager()) for _ in range(3)]
    got = [float(graphed()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(got)))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2 * TOL[torch.bfloat16], atol=0)
