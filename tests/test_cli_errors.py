"""Every command line answers bad input with one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastres.models.registry import list_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def _one_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def _exits(main, argv, capsys) -> str:
    """Call main(argv) as the command line would; return its one stderr line after a non-zero exit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None), f"{argv}: exit status {rc}"
    return _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ parity
@no_cuda
@pytest.mark.parametrize("argv,needle", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--backend", "cuda", "--device", "cpu"], "--backend cuda"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "1"], "--batch-size"),
    (["--device", "tpu9"], "--device"),
    (["--arch", "resnet21"], "invalid choice"),
])
def test_parity_bad_args(argv, needle, capsys):
    from fastres.parity import main

    assert needle in _exits(main, argv, capsys)


def test_parity_archs_and_help_come_from_the_registry(monkeypatch):
    from fastres import parity

    seen = {}

    def grab(self, *args, **kw):
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(parity._Parser, "parse_args", grab)
    with pytest.raises(SystemExit):
        parity.main([])
    actions = {a.dest: a for a in seen["parser"]._actions}
    assert set(actions["arch"].choices) >= set(list_models("cifar"))
    assert set(actions["arch"].choices) <= set(list_models())
    assert all(a.help for a in actions.values()), [d for d, a in actions.items() if not a.help]


# ------------------------------------------------------------------------------------------- bench
@no_cuda
def test_bench_device_cuda_without_gpu(tmp_path, capsys):
    from fastres.bench.cli import main

    out = tmp_path / "b.json"
    assert "no CUDA GPU" in _exits(main, ["--device", "cuda", "--json", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--arch", "resnet21"], ["--quick", "--levels", "ops", "--only", "no-such-row"],
                                  ["--levels", "nope"], ["--rounds", "0"]])
def test_bench_nothing_to_measure_writes_nothing(argv, tmp_path, capsys):
    from fastres.bench.cli import main

    out = tmp_path / "b.json"
    _exits(main, ["--device", "cpu", "--no-progress", *argv, "--json", str(out)], capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- train
@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "0"], "--epochs"),
    (["--arch", "resnet21"], "unknown --arch"),
    (["--no-such-option"], "unrecognized"),
    (["--batch-size", "1"], "--batch-size"),
])
def test_train_bad_args(argv, needle, tmp_path, capsys):
    from fastres.train.cli import cli

    assert needle in _exits(cli, [*argv, "--out", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()


@no_cuda
def test_train_device_cuda_without_gpu(tmp_path, capsys):
    from fastres.train.cli import cli

    assert "no CUDA GPU" in _exits(cli, ["--device", "cuda", "--out", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [os.urandom(300), None])
def test_train_resume_from_a_file_that_is_no_checkpoint(content, tmp_path, capsys):
    from fastres.train.cli import cli

    bad = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, bad)  # a torch file, but not one fastres.train wrote
    else:
        bad.write_bytes(content)
    line = _exits(cli, ["--resume", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert "not a fastres checkpoint" in line and "weights_only" not in line
    assert not (tmp_path / "run").exists(), "a failed start left an empty run folder"


# ----------------------------------------------------------------------------------- kernels.report
@pytest.mark.parametrize("argv,needle", [
    ([], "--out"),
    (["--arch", "70"], "--arch"),
    (["--arch", "x"], "--arch"),
    (["--cases", "no-such-case"], "--cases"),
    (["--dtype", "int8"], "--dtype"),
])
def test_kernels_report_bad_args(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # else main re-executes itself
    from kernels.report import main

    out = [] if not argv else ["--out", str(tmp_path / "r")]
    assert needle in _exits(main, [*out, *argv], capsys)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------- as a user runs them: python -m ...
@no_cuda
@pytest.mark.parametrize("module,argv", [("fastres.parity", ["--device", "cuda"]),
                                         ("fastres.bench", ["--device", "cuda"]),
                                         ("fastres.train", ["--device", "cuda"])])
def test_python_m_one_line(module, argv, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    _one_line(r.stderr, "no CUDA GPU")
    assert not os.listdir(tmp_path), "nothing is written on bad input"
