"""python -m fastres.train --cuda-graphs: what --help says, the one-line refusals (no CUDA GPU, --device cpu,
--compile, --amp fp16, several processes), the trainer's handling of what a graph bakes in (checked on a
CPU with a stand-in for fastres.GraphedStep), and on a GPU (marker gpu) a tiny run with the flag against
the same run without it, and a resume from a checkpoint written with the flag.

The trainer's contract with the flag: every step trains what it trains without it. On a CPU the stand-in
runs each "replay" eagerly, so the run with the flag must equal the run without it exactly (same
kernels, same values, same order); what it checks is the trainer's side: a capture at each lr change,
a partial batch run eagerly, momentum and the data's RNG kept across a capture and a resume.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from numerics import tol
from train_helpers import run_cut_after_first_checkpoint

from fastres import graphs
from fastres.train import cli as ftrain
from fastres.train import graphed as fgraphed

THREADS = ["--threads", "1", "--no-progress"]
# 56 digits (random crops: the RNG is in use) in batches of 16: 3 full batches and one of 8 per epoch;
# 2 epochs of 4 steps, lr 0.02 for steps 0-3, 0.002 for 4-5, 0.0002 for 6-7 (the paper's schedule):
# 3 captures (steps 0, 4, 6); steps 3 and 7 (the partial batches) run eagerly.
TINY = ["--data", "digits", "--limit-train", "56", "--image-size", "8", "--batch-size", "16", "--epochs", "2",
        "--lr", "0.02", *THREADS]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------- the command line
def test_help_says_what_the_flag_needs_and_does():
    text = " ".join(ftrain.parser().format_help().split())
    assert "--cuda-graphs" in text
    for needle in ("fastres.GraphedStep", "Needs a CUDA GPU and one process", "not with --compile or --amp fp16",
                   "partial batch runs eagerly", "nothing is dropped", "captured again whenever the schedule "
                   "changes the lr", "do not count"):
        assert needle in text, needle


@pytest.mark.parametrize("argv, needle", [
    (["--device", "cpu"], "--cuda-graphs needs a CUDA GPU: it does not run with --device cpu"),
    pytest.param([], "--cuda-graphs needs a CUDA GPU: none is available here", marks=no_cuda),
    (["--compile"], "--cuda-graphs and --compile: choose one"),
    (["--amp", "fp16"], "--cuda-graphs does not run --amp fp16"),
])
def test_refusals_are_one_line_before_anything_is_written(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    assert ftrain.cli(["--cuda-graphs", *argv, "--out", str(out), *THREADS]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fastres.train: error: ") and needle in line, line
    assert not out.exists()


def test_several_processes_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine under torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ftrain.cli(["--cuda-graphs", "--out", str(tmp_path / "run"), *THREADS]) == 2
    assert "--cuda-graphs runs in one process, not 2" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_python_m_with_device_cpu_is_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastres.train", "--cuda-graphs", "--device", "cpu", *THREADS],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "--cuda-graphs needs a CUDA GPU" in _one_line(r.stderr)
    assert not os.listdir(tmp_path), "nothing is written on bad input"


# ------------------------------------------------------------------ the trainer's side, on a CPU
class StandIn(graphs.GraphedStep):
    """GraphedStep without CUDA: its warm-up's effects (steps that move parameters, BatchNorm buffers, the
    optimizer's state and the RNG; then parameters and buffers put back and the state zeroed in place),
    its per-call check, and each "replay" run eagerly (the graph's backward writes, never accumulates, the
    gradients: so does the stand-in)."""

    lrs = []

    def __init__(self, model, optimizer, loss_fn, example_x, example_y, warmup_steps=3):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.static_x, self.static_y = example_x.clone(), example_y.clone()
        self._params, self._training = tuple(id(p) for p in model.parameters()), model.training
        tensors = list(model.parameters()) + list(model.buffers())
        saved = [t.detach().clone() for t in tensors]
        for _ in range(warmup_steps):
            torch.rand(3)  # a warm-up that draws random numbers must not move the data's stream
            self._step()
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
            for state in optimizer.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
        self._hyper = graphs._hyper(optimizer)  # (a capture records kernels, it runs none: nothing to do here)
        StandIn.lrs.append(optimizer.param_groups[0]["lr"])

    def _step(self):
        self.optimizer.zero_grad(set_to_none=True)
        return super()._step()

    def __call__(self, x, y):
        self.check(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        return self._step()


@pytest.fixture
def stand_in(monkeypatch):
    """--cuda-graphs on this machine: fastres.GraphedStep replaced by StandIn, the CUDA check off."""
    StandIn.lrs = []
    monkeypatch.setattr(fgraphed, "GraphedStep", StandIn)
    monkeypatch.setattr(ftrain, "check_cuda_graphs", lambda a, dist: None)
    return StandIn


def _same_run(a, b):
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for k in ("epoch", "lr", "train_loss", "train_error", "test_loss", "test_error"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
    for (k, va), vb in zip(a["model"].state_dict().items(), b["model"].state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("amp", [[], ["--amp", "bf16"]], ids=["fp32", "bf16"])
def test_trainer_captures_at_each_lr_and_trains_as_without_the_flag(tmp_path, stand_in, amp):
    eager = ftrain.main([*TINY, *amp, "--device", "cpu", "--out", str(tmp_path / "eager")])
    graphed = ftrain.main([*TINY, *amp, "--device", "cpu", "--cuda-graphs", "--out", str(tmp_path / "graphed")])
    assert stand_in.lrs == pytest.approx([0.02, 0.002, 0.0002])  # steps 0, 4 and 6 capture; 3 and 7: eager
    _same_run(eager, graphed)



def _full_and_cut_after_epoch1(tmp_path, monkeypatch, args):
    """A whole run of `args` (its result), and a run cut after its first checkpoint (in tmp_path/cut, a copy of
    that checkpoint's path returned beside it)."""
    full = ftrain.main([*args, "--out", str(tmp_path / "full")])
    run_cut_after_first_checkpoint(monkeypatch, [*args, "--out", str(tmp_path / "cut")])
    epoch1 = str(tmp_path / "epoch1.pt")
    shutil.copy(tmp_path / "cut" / "checkpoint.pt", epoch1)
    return full, epoch1


def test_resume_of_a_run_with_the_flag_continues_it(tmp_path, stand_in, monkeypatch):
    args = [*TINY, "--device", "cpu", "--cuda-graphs"]
    full, epoch1 = _full_and_cut_after_epoch1(tmp_path, monkeypatch, args)
    stand_in.lrs = []
    resumed = ftrain.main([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert stand_in.lrs == pytest.approx([0.002, 0.0002])  # the first capture found the checkpoint's momentum
    _same_run(full, resumed)
    # the checkpoint written with the flag, resumed without it
    _same_run(full, ftrain.main([*TINY, "--device", "cpu", "--out", str(tmp_path / "eager"), "--resume", epoch1]))


# ------------------------------------------------------------------------------------------- on a GPU
# Within the house's per-dtype bound (tests/numerics.py: fp32 1e-5, bf16 1.6e-2), not exactly: the two
# runs launch the same kernels on the same values, but reductions whose order is not fixed (atomic adds
# of split reductions, cuDNN's algorithm choice) may round differently by an ulp or so per step, and 8
# SGD steps at lr <= 0.02 over batches of 16 (BatchNorm over >= 16 x 8 x 8 values per channel at the
# first layers) amplify that far less than 100-fold. TF32 off: fp32 means fp32 here. Error rates may
# differ by one image, where a prediction is a near tie.
@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    lrs = []

    class Counted(graphs.GraphedStep):
        def __init__(self, model, optimizer, *args, **kw):
            lrs.append(optimizer.param_groups[0]["lr"])
            super().__init__(model, optimizer, *args, **kw)

    monkeypatch.setattr(fgraphed, "GraphedStep", Counted)
    return lrs


def _close_run(a, b, dtype):
    rel = tol(dtype)
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert (ra["epoch"], ra["lr"]) == (rb["epoch"], rb["lr"])
        for k in ("train_loss", "test_loss"):
            assert ra[k] == pytest.approx(rb[k], rel=rel), (ra["epoch"], k)
        assert ra["train_error"] == pytest.approx(rb["train_error"], abs=1.5 / 56)
        assert ra["test_error"] == pytest.approx(rb["test_error"], abs=1.5 / 360)
    for (k, va), vb in zip(a["model"].state_dict().items(), b["model"].state_dict().values(), strict=True):
        scale = max(va.abs().max().item(), 1e-3) if va.is_floating_point() else 0
        torch.testing.assert_close(va, vb, rtol=rel, atol=rel * scale, msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("amp, dtype", [([], torch.float32), (["--amp", "bf16"], torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_gpu_run_with_the_flag_trains_as_without_it(tmp_path, on_gpu, amp, dtype):
    eager = ftrain.main([*TINY, *amp, "--device", "cuda", "--out", str(tmp_path / "eager")])
    graphed = ftrain.main([*TINY, *amp, "--device", "cuda", "--cuda-graphs", "--out", str(tmp_path / "graphed")])
    assert on_gpu == pytest.approx([0.02, 0.002, 0.0002])
    _close_run(eager, graphed, dtype)


@pytest.mark.gpu
def test_gpu_checkpoint_written_with_the_flag_resumes(tmp_path, on_gpu, monkeypatch):
    args = [*TINY, "--device", "cuda", "--cuda-graphs"]
    full, epoch1 = _full_and_cut_after_epoch1(tmp_path, monkeypatch, args)
    _close_run(full, ftrain.main([*args, "--out", str(tmp_path / "cut"), "--resume"]), torch.float32)
    _close_run(full, ftrain.main([*TINY, "--device", "cuda", "--out", str(tmp_path / "eager"), "--resume", epoch1]),
               torch.float32)
