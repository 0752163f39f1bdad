"""fastres.bench's CPU inference baselines (fastres/bench/baselines.py): ONNX Runtime computes what the
PyTorch model computes (house rule against the float64 model, so a wrong export cannot be timed), the rows
are eval-only and CPU-only, onnxruntime's absence is a real pytest skip that names the install, quick mode
stays short, and the terminal table and summarize.py show the new baselines and their speed over eager."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from numerics import assert_as_good

from fastres.bench import baselines
from fastres.bench import cases as bcases
from fastres.bench import models as bmodels
from fastres.bench import timing as bench_timing
from fastres.bench.config import make_setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW_PAIRS = [("fastres-torch", "onnxruntime"), ("fastres-torch", "compile+freezing")]


def _needs_onnx():
    why = baselines.onnx_missing()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("arch,fmt", [("resnet50", "nchw"), ("resnet18", "channels_last")])
def test_onnxruntime_output_is_as_good_as_pytorch(arch, fmt):
    """The exported model under ONNX Runtime against the float64 model: within twice PyTorch's own fp32
    error (+ a few ulps); its input is the row's input as an NCHW array whatever the row's format."""
    _needs_onnx()
    setup = make_setup("cpu")
    step = bmodels.make_model(arch, "infer", 2, "onnxruntime", setup, image=32, fmt=fmt, seed=3)
    (feed,) = step.call.feed.values()
    assert feed.flags["C_CONTIGUOUS"] and feed.shape == (2, 3, 32, 32) and feed.dtype.name == "float32"
    x = torch.from_numpy(feed)
    assert torch.equal(x, step.x)  # the same values as the PyTorch providers' input (theirs in `fmt`)
    got = torch.from_numpy(step())
    model = bmodels.build_model(arch, "eager", seed=3).eval()
    with torch.no_grad():
        ref = model(x)
        oracle = copy.deepcopy(model).double()(x.double())
    assert got.shape == ref.shape == (2, 1000) and float(ref.abs().max()) > 0
    assert_as_good(got, ref, oracle, name=f"{arch} onnxruntime logits")


def test_new_pairs_are_cpu_eval_rows_only():
    full = make_setup("cpu")
    assert all(p in full.pairs for p in NEW_PAIRS)
    rows = bcases.cases(full, "models") + bcases.cases(full, "blocks") + bcases.cases(full, "ops")
    new = [c for c in rows if (c.provider, c.baseline) in NEW_PAIRS]
    for c in new:
        why = c.skip_reason(full)
        if c.level != "models" or " train " in f" {c.name} ":
            assert why and "inference baseline" in why, c.id
        elif c.baseline == "compile+freezing":
            assert why is None, c.id   # one forward graph to compile: every eval row under compile='some'
    names = {c.name for c in new if c.level == "models"}
    assert {"resnet50 infer b1 224px nchw", "resnet50 infer b1 224px channels_last"} <= names
    assert not any("224px" in n and " train " in n for n in names)   # the 224 px rows are inference only
    gpu = make_setup("cpu")
    gpu.device = torch.device("cuda")
    eval_row = next(c for c in new if c.name == "resnet18 infer b16 64px nchw")
    assert "on a CPU only" in eval_row.skip_reason(gpu)
    with pytest.raises(LookupError, match="eval rows only"):
        bmodels.make_model("resnet20", "train", 2, "compile+freezing", full, image=8)


def test_quick_mode_stays_short():
    quick = make_setup("cpu", quick=True)
    rows = [c for c in bcases.cases(quick, "models") if c.skip_reason(quick) is None]
    assert not any("224px" in c.name for c in bcases.cases(quick, "models"))
    assert not any(c.baseline == "compile+freezing" for c in rows)   # off with torch.compile
    ort = {c.name for c in rows if c.baseline == "onnxruntime"}
    if baselines.onnx_missing() is None:   # an export each: the representative rows only
        assert ort == {"resnet18 infer b16 64px nchw", "resnet18 infer b16 64px channels_last",
                       "resnet20 infer b32 32px nchw"}


def test_missing_onnxruntime_is_a_pytest_skip_naming_the_install(tmp_path):
    """The benchmark suite with onnxruntime made unimportable: the row is skipped, the reason says how to
    install it, and nothing fails."""
    (tmp_path / "block_ort.py").write_text("import sys\nsys.modules['onnxruntime'] = None\n")
    env = dict(os.environ, FASTRES_BENCH_QUICK="1", FASTRES_BENCH_ONLY="resnet20 infer b32 32px nchw",
               FASTRES_BENCH_PROVIDERS="fastres-torch,onnxruntime",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_models.py", "--benchmark-only", "-p",
                        "block_ort", "-p", "no:cacheprovider", "-rs", "-q"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "1 skipped" in out and "passed" not in out and "pip install onnxruntime" in out, out[-3000:]


def _row(case, provider, baseline, ms, base_ms):
    return dict(level="models", case=case, provider=provider, baseline=baseline, median_ms=ms,
                baseline_median_ms=base_ms, ratio=base_ms / ms, ratio_paired=base_ms / ms, iterations=1, rounds=3)


ROWS = [_row("resnet50 infer b8 64px nchw", "fastres-torch", "eager", 160.0, 170.0),
        _row("resnet50 infer b8 64px nchw", "fastres-torch", "onnxruntime", 162.0, 68.0),
        _row("resnet50 infer b8 64px nchw", "fastres-torch", "compile+freezing", 158.0, 100.0),
        _row("resnet50 train b8 64px nchw", "fastres-torch", "eager", 600.0, 630.0)]


def test_terminal_table_shows_the_new_baselines_and_speeds_over_eager():
    text = bench_timing.table(ROWS + [dict(level="models", case="resnet50 train b8 64px nchw",
                                           provider="fastres-torch", baseline="onnxruntime",
                                           skipped="onnxruntime is a CPU inference baseline")])
    assert "compile+freezing " in text and "onnxruntime " in text and " 0.42x" in text
    vs = bench_timing.versus_eager(ROWS)
    assert list(vs) == ["resnet50 infer b8 64px nchw"]   # the training row has one baseline only
    got = vs["resnet50 infer b8 64px nchw"]
    e = 170 / 160   # fastres-torch's ratio to eager; a baseline's speed is chained through fastres-torch
    assert got == {"eager": (1.0, 170.0), "fastres-torch": (e, 160.0), "onnxruntime": (e / (68 / 162), 68.0),
                   "compile+freezing": (e / (100 / 158), 100.0)}
    assert "onnxruntime 2.53x" in text and "compile+freezing 1.68x" in text and "fastres-torch 1.06x" in text


def test_summary_tables_speeds_over_eager(tmp_path):
    bench = [dict(extra_info=dict(r, median_s=r["median_ms"] / 1e3, baseline_median_s=r["baseline_median_ms"] / 1e3))
             for r in ROWS]
    (tmp_path / "bench.json").write_text(json.dumps(dict(benchmarks=bench, machine_info={})))
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "summarize.py"), str(tmp_path)], check=True,
                   capture_output=True)
    text = (tmp_path / "summary.md").read_text()
    assert "fastres-torch / onnxruntime" in text and "fastres-torch / compile+freezing" in text
    vs = text.split("### Speed over eager")[1]
    line = next(x for x in vs.splitlines() if x.startswith("| resnet50 infer b8 64px nchw | 170 |"))
    assert "**2.53x** (68)" in line and "**1.68x** (100)" in line and "**1.06x** (160)" in line
    assert "resnet50 train" not in vs.split("###")[0]


def test_freezing_baseline_is_frozen_even_after_a_plain_compile_row():
    """Dynamo reuses graphs per code object across instances, blind to inductor's freezing flag: the
    freezing baseline compiles its own function after a reset, so it freezes even when a plain compile of
    the same class and shapes ran first, and a later plain compile reads its own weights."""
    import torch.nn as nn

    from fastres.bench.baselines import FreezingCall
    from fastres.bench.config import compiled

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()

    torch.manual_seed(0)
    a, b, c = net(), net(), net()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        compiled(a)(x)
        frozen = FreezingCall(b, x)
        before = frozen()
        b[0].weight.mul_(2)            # a frozen graph baked the old weights in: its output stays
        torch.testing.assert_close(frozen(), before, rtol=0, atol=0)
        torch.testing.assert_close(compiled(c)(x), c(x))
