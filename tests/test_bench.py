"""fastres.bench: the cases compute what they claim (providers agree), and the command line runs (--quick)."""
import json

import pytest
import torch

from fastres import bench


@pytest.fixture(scope="module")
def cpu_setup():
    return bench.make_setup("cpu", quick=True)


def test_resnet50_conv_shapes_are_every_distinct_conv():
    shapes = bench.resnet50_conv_shapes(224)
    ids = {s.id for s in shapes}
    assert "3x224x224-64k7s2-relu" in ids                     # stem
    assert "128x56x56-128k3s2-relu" in ids                    # layer2.0.conv2 (stride on the 3x3, v1.5)
    assert "512x7x7-2048k1s1-add_relu" in ids                 # layer4 conv3: BN + add + ReLU
    assert "1024x14x14-2048k1s2-bn" in ids                    # layer4 downsample
    assert len(ids) == len(shapes) == 24  # stem; layer1: 5; layer2-4: 6 each (1x1 in at two sizes)
    assert sum(s.epilogue == "add_relu" for s in shapes) == 4


def test_op_cost_counts_bytes_and_flops():
    s = bench.ConvShape(64, 256, 1, 1, 0, 56, 56, "add_relu")
    nbytes, flops = bench.op_cost("infer", s, 2, 2)
    n_in, n_out = 2 * 64 * 56 * 56, 2 * 256 * 56 * 56
    assert nbytes == (n_in + 256 * 64 + 2 * n_out) * 2  # x, w, residual read; y written
    assert flops == 2 * n_out * 64
    assert bench.op_cost("bn_act", s, 2, 2) == (4 * n_out * 2, 0)


@pytest.mark.parametrize("kind", ["train_fwd", "train_fwdbwd", "infer", "bn_act"])
def test_op_providers_compute_the_same(cpu_setup, kind):
    """fastres and eager run the same op on the same inputs (else the ratios compare different work)."""
    s = bench.ConvShape(8, 16, 3, 2, 1, 8, 8, "add_relu")
    out = {}
    for p in ("fastres-torch", "eager"):
        if kind == "bn_act" and p == "fastres-torch":
            continue
        out[p] = bench.make_op(kind, s, p, cpu_setup, seed=3)()
    if kind == "bn_act":
        y = out["eager"]
        assert torch.isfinite(y).all() and (y >= 0).all() and y.shape == (cpu_setup.op_batch, 16, 4, 4)
        return
    a, b = out["fastres-torch"], out["eager"]
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_block_and_model_steps_train(cpu_setup):
    step = bench.make_block("basic-layer1.0", "train", "fastres-torch", cpu_setup)
    before = step.module.conv1.weight.detach().clone()
    loss = step()
    assert torch.isfinite(loss) and not torch.equal(before, step.module.conv1.weight)
    model = bench.make_model("resnet18", "infer", 2, "eager", cpu_setup)
    assert model().shape == (2, 1000)


def test_cli_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "resnet18 train b2" in text and "fastres-torch" in text and "vs eager" in text
    data = json.loads(out.read_text())
    assert data["environment"]["device_type"] == "cpu" and data["environment"]["torch"] == torch.__version__
    timed = [r for r in data["results"] if "median_ms" in r]
    assert {r["provider"] for r in timed} == {"fastres-torch", "eager"}
    assert all(r["median_ms"] > 0 and r["images/s"] > 0 for r in timed)
    assert all("skipped" in r for r in data["results"] if r["provider"] == "compile")
