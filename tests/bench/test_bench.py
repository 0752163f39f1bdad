"""fastres.bench: the rows compute what they claim (both providers of a row run the same math), the timing
alternates and reports ratios, the CPU setup has the sizes it promises, and the command line, the pytest
suite and benchmarks/summarize.py run end to end (tiny sizes, few rounds)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastres.bench import cases as bcases
from fastres.bench import cli as bcli
from fastres.bench import models as bmodels
from fastres.bench import ops as bops
from fastres.bench import timing as bench_timing
from fastres.bench.config import make_setup, quick_requested
from fastres.bench.environment import environment, results_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cpu_setup():
    return make_setup("cpu", quick=True)


def _flat(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def test_resnet50_conv_shapes_are_every_distinct_conv():
    shapes = bops.resnet50_conv_shapes(224)
    ids = {s.id for s in shapes}
    assert "3x224x224-64k7s2-relu" in ids                     # stem
    assert "128x56x56-128k3s2-relu" in ids                    # layer2.0.conv2 (stride on the 3x3, v1.5)
    assert "512x7x7-2048k1s1-add_relu" in ids                 # layer4 conv3: BN + add + ReLU
    assert "1024x14x14-2048k1s2-bn" in ids                    # layer4 downsample
    assert len(ids) == len(shapes) == 24  # stem; layer1: 5; layer2-4: 6 each (1x1 in at two sizes)
    assert sum(s.epilogue == "add_relu" for s in shapes) == 4


def test_op_cost_counts_bytes_and_flops():
    s = bops.ConvShape(64, 256, 1, 1, 0, 56, 56, "add_relu")
    nbytes, flops = bops.op_cost("infer", s, 2, 2)
    n_in, n_out = 2 * 64 * 56 * 56, 2 * 256 * 56 * 56
    assert nbytes == (n_in + 256 * 64 + 2 * n_out) * 2  # x, w, residual read; y written
    assert flops == 2 * n_out * 64
    assert bops.op_cost("bn_act", s, 2, 2) == (4 * n_out * 2, 0)


@pytest.mark.parametrize("kind", ["train_fwd", "train_fwdbwd", "infer", "bn_act"])
def test_op_providers_compute_the_same(cpu_setup, kind):
    """fastres and eager run the same op on the same inputs (else the ratios compare different work)."""
    s = bops.ConvShape(8, 16, 3, 2, 1, 8, 8, "add_relu")
    if kind == "bn_act":
        with pytest.raises(LookupError):
            bops.make_op(kind, s, "fastres-torch", cpu_setup)
        y = bops.make_op(kind, s, "eager", cpu_setup, seed=3)()
        assert torch.isfinite(y).all() and (y >= 0).all() and (y > 0).any()
        assert y.shape == (cpu_setup.op_batch, 16, 4, 4)
        return
    a, b = (bops.make_op(kind, s, p, cpu_setup, seed=3)() for p in ("fastres-torch", "eager"))
    for x, y in zip(_flat(a), _flat(b)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fwd", "infer", "fwdbwd"])
def test_host_row_runs_the_same_module_math(cpu_setup, kind):
    """FusedConvBNReLU2d gets the nn.Conv2d + nn.BatchNorm2d weights and buffers: same outputs / gradients."""
    a, b = (bops.make_host(kind, p, cpu_setup, seed=5)() for p in ("fastres-torch", "eager"))
    assert len(_flat(a)) == (4 if kind == "fwdbwd" else 1)  # dx, dweight, dgamma, dbeta
    for x, y in zip(_flat(a), _flat(b)):
        assert x.shape == y.shape and float(y.abs().sum()) > 0
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,image", [("resnet18", 32), ("resnet20", 8)])
def test_models_share_weights(cpu_setup, arch, image):
    """fastres' model holds the plain-PyTorch model's weights (strict load): same logits in eval mode."""
    x = torch.randn(2, 3, image, image)
    fused, ref = (bmodels.build_model(arch, p, seed=1).eval() for p in ("fastres-torch", "eager"))
    fastres_code = ("fastres.models", "fastres.nn")
    assert type(fused).__module__.startswith(fastres_code)
    assert not any(type(m).__module__.startswith(fastres_code) for m in ref.modules())  # plain PyTorch only
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


def test_block_and_model_steps_train(cpu_setup):
    step = bmodels.make_block("basic-layer1.0", "train", "fastres-torch", cpu_setup)
    before = step.module.conv1.weight.detach().clone()
    loss = step()
    assert torch.isfinite(loss) and not torch.equal(before, step.module.conv1.weight)
    model = bmodels.make_model("resnet20", "train", 4, "fastres-torch", cpu_setup, image=8, fmt="channels_last")
    assert model.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(model())
    infer = bmodels.make_model("resnet18", "infer", 2, "eager", cpu_setup, image=32)
    assert infer().shape == (2, 1000)


def test_cpu_setup_times_real_cpu_sizes():
    full, quick = make_setup("cpu"), make_setup("cpu", quick=True)
    names = {c.name for c in bcases.cases(full, "models")}
    for name in ("resnet18 train b16 64px nchw", "resnet18 infer b16 64px channels_last",
                 "resnet50 train b8 64px channels_last", "resnet50 infer b8 64px nchw",
                 "resnet20 train b32 32px nchw", "resnet20 infer b32 32px channels_last",
                 "resnet50 infer b1 224px nchw", "resnet50 infer b1 224px channels_last",
                 "resnet18 infer b1 224px nchw", "resnet18 infer b1 224px channels_last"):
        assert name in names
    assert {c.name for c in bcases.cases(full, "ops")} == {f"host conv3x3-bn-relu 2x8x4x4 {k}"
                                                          for k in ("fwd", "infer", "fwdbwd")}
    assert full.pairs == [("fastres-torch", "eager"), ("fastres-torch+frozen", "eager"),
                          ("fastres-torch+compile", "compile"), ("fastres-torch", "onnxruntime"),
                          ("fastres-torch", "compile+freezing"), ("fastres-torch+frozen", "onnxruntime"),
                          ("fastres-torch+frozen", "compile+freezing")]   # the last four: tests/bench/test_baselines.py
    compiled = [c for c in bcases.cases(full, "models") if c.baseline == "compile" and c.skip_reason(full) is None]
    assert {c.name for c in compiled} >= {"resnet18 train b16 64px nchw", "resnet18 infer b16 64px channels_last"}
    assert quick.rounds < full.rounds and quick.compile == "none"
    assert all(c.skip_reason(quick) for c in bcases.cases(quick, "models") if c.baseline == "compile")
    rows = bcases.cases(quick, "models")
    assert all(c.skip_reason(quick) is None for c in rows
               if c.baseline == "eager" and (c.provider == "fastres-torch" or " infer " in f" {c.name} "))
    frozen_train = [c for c in rows if c.provider.endswith("+frozen") and " train " in f" {c.name} "]
    assert frozen_train and all("inference mode" in c.skip_reason(quick) for c in frozen_train)


def test_quick_mode_follows_ci(monkeypatch):
    monkeypatch.delenv("FASTRES_BENCH_QUICK", raising=False)
    monkeypatch.setenv("CI", "true")
    assert quick_requested()
    monkeypatch.setenv("FASTRES_BENCH_QUICK", "0")
    assert not quick_requested()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("FASTRES_BENCH_QUICK", "1")
    assert quick_requested()


def test_alternate_interleaves_and_reports_ratios():
    order = []
    c_times, b_times = bench_timing.alternate(lambda: order.append("c"), lambda: order.append("b"), rounds=4,
                                              iterations=2)
    assert "".join(order) == "bbcc" "ccbb" "bbcc" "ccbb" and len(c_times) == len(b_times) == 4
    fig = bench_timing.summary([1.0, 2.0, 3.0], [2.0, 4.0, 9.0])
    assert fig["median_s"] == 2.0 and fig["baseline_median_s"] == 4.0 and fig["ratio"] == 2.0
    assert fig["ratio_paired"] == 2.0 and fig["min_s"] == 1.0
    order.clear()
    c_times, _ = bench_timing.alternate(lambda: order.append("c"), lambda: order.append("b"), rounds=2,
                                        iterations=2, settle=1)   # one untimed call before each round
    assert "".join(order) == "bbbccc" "cccbbb" and len(c_times) == 2


def test_warm_up_repeats_tiny_calls(cpu_setup):
    calls = []
    iterations = bench_timing.warm_up((lambda: calls.append(1),), cpu_setup)
    # (how many calls make a ~1 ms round depends on the machine's speed and load: only that it is counted)
    assert isinstance(iterations, int) and iterations >= 1 and len(calls) == max(1, cpu_setup.warmup) + 1
    assert bench_timing.rounds_for(cpu_setup, iterations) == max(cpu_setup.rounds, cpu_setup.tiny_rounds)


def test_environment_names_the_machine():
    env = environment("cpu")
    for key in ("device", "cores", "torch", "triton", "torchvision", "python", "fastres", "git_commit",
                "cpu_capability", "date"):
        assert key in env
    assert env["device"] and env["device"] == env["cpu"] and env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    d = results_dir(env)
    assert d.startswith(os.path.join("benchmarks", "results", env["date"][:10] + "-cpu-")) and " " not in d


def test_cli_runs_the_host_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bcli.main(["--quick", "--device", "cpu", "--levels", "ops", "--rounds", "2", "--no-progress",
                     "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "host conv3x3-bn-relu 2x8x4x4 fwdbwd" in text and "ratio" in text and "fastres.bench (quick)" in text
    data = json.loads(out.read_text())
    assert data["environment"]["device_type"] == "cpu" and data["environment"]["torch"] == torch.__version__
    timed = [r for r in data["results"] if "median_ms" in r]
    assert len(timed) == 3 and {(r["provider"], r["baseline"]) for r in timed} == {("fastres-torch", "eager")}
    for r in timed:
        assert r["median_ms"] > 0 and r["baseline_median_ms"] > 0 and r["iterations"] >= 1
        assert r["ratio"] == pytest.approx(r["baseline_median_ms"] / r["median_ms"])
    assert all("skipped" in r for r in data["results"] if r["baseline"] == "compile")

    os.makedirs(tmp_path / "results")
    os.replace(out, tmp_path / "results" / "bench.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "summarize.py"), str(tmp_path / "results")],
                   check=True, capture_output=True)
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "### Ops" in summary and "fastres-torch / eager" in summary and "Device: " in summary


def test_pytest_suite_records_both_providers(tmp_path):
    """`pytest benchmarks/ --benchmark-only` on one host row: the JSON carries both medians and the ratio."""
    out = tmp_path / "b.json"
    env = dict(os.environ, FASTRES_BENCH_QUICK="1", FASTRES_BENCH_ONLY="fwdbwd", FASTRES_BENCH_ROUNDS="2")
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_ops.py", "--benchmark-only", "-q",
                        "-p", "no:cacheprovider", f"--benchmark-json={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    (b,) = data["benchmarks"]
    info = b["extra_info"]
    assert info["provider"] == "fastres-torch" and info["baseline"] == "eager" and info["iterations"] >= 1
    assert len(info["baseline_times_s"]) == b["stats"]["rounds"] >= 2
    assert info["ratio"] == pytest.approx(info["baseline_median_s"] / info["median_s"])
    assert data["machine_info"]["fastres"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
