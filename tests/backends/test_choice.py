"""Backend choice: explicit requests never fall back silently; auto picks torch on CPU; a call a
backend's kernels do not cover runs on torch and is counted."""
import os
import subprocess
import sys
import types

import pytest
import torch

import fastres
from fastres import backend


def test_default_and_env_validation():
    env = dict(os.environ, FASTRES_BACKEND="nonsense")
    r = subprocess.run([sys.executable, "-c", "import fastres"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown fastres backend 'nonsense'" in r.stderr and "auto, triton, cuda, torch" in r.stderr
    env["FASTRES_BACKEND"] = "torch"
    r = subprocess.run([sys.executable, "-c", "import fastres; print(fastres.get_backend())"], env=env,
                       capture_output=True, text=True)
    assert r.stdout.strip() == "torch", r.stderr


def test_set_and_use_backend():
    fastres.set_backend("torch")
    assert fastres.get_backend() == "torch"
    with fastres.use_backend("auto"):
        assert fastres.get_backend() == "auto"
    assert fastres.get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown fastres backend"):
        fastres.set_backend("fast")


def test_auto_runs_torch_on_cpu():
    fastres.set_backend("auto")
    assert backend.resolve("conv_bn_act", torch.device("cpu")) == "torch"


def test_cuda_backend_refuses_cpu_tensors_or_missing_build():
    ok, why = backend.available("cuda")
    if not ok:
        with pytest.raises(backend.BackendUnavailableError, match="not available"):
            fastres.set_backend("cuda")
        assert "fastres._C" in why
        return
    fastres.set_backend("cuda")
    with pytest.raises(backend.BackendUnavailableError, match="needs CUDA tensors; got tensors on cpu"):
        backend.resolve("conv_bn_act", torch.device("cpu"))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    if not backend.available("triton")[0]:
        pytest.skip(f"triton backend not importable: {backend.available('triton')[1]}")
    fastres.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backend.resolve("conv_bn_act", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve("conv_bn_act", torch.device("cpu")) == "triton"


def test_uncovered_call_runs_torch_and_is_counted(monkeypatch):
    fake = types.ModuleType("fake_backend")
    fake.conv_bn_act_supports = lambda **kw: "groups=2" if kw["groups"] != 1 else None
    fake.conv_bn_act_forward = lambda *a: "fake"
    fake.device_reason = lambda device: None
    monkeypatch.setitem(backend.REGISTRY, "triton", "fake_backend")
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    monkeypatch.setitem(backend._modules, "triton", fake)  # an earlier test may have imported the real one
    monkeypatch.setattr(backend, "_requested", "triton")
    monkeypatch.setattr(backend, "available", lambda name: (True, ""))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend.calls.clear()
    name, fn = backend.implementation("conv_bn_act", "forward", torch.device("cpu"), groups=2)
    assert name == "torch" and fn.__module__ in ("fastres.backends.torch", "fastres.ops.reference")
    assert backend.calls[("conv_bn_act", "forward", "triton->torch")] == 1
    name, fn = backend.implementation("conv_bn_act", "forward", torch.device("cpu"), groups=1)
    assert name == "triton" and fn() == "fake"


def test_info_command():
    r = subprocess.run([sys.executable, "-m", "fastres.info"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for word in ("torch", "triton", "extension fastres._C", "conv_bn_act", "backend"):
        assert word in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastres.info", "--json"], capture_output=True, text=True)
    import json

    info = json.loads(r.stdout)
    assert info["conv_bn_act runs on"]["cpu"] == "torch"


def test_auto_on_cuda_follows_the_recorded_preference(monkeypatch):
    fastres.set_backend("auto")
    cuda = torch.device("cuda")
    assert backend.resolve("conv_bn_act", cuda) == "torch"  # nothing verified on a GPU is on record
    monkeypatch.setitem(backend.AUTO_PREFERENCE, "conv_bn_act", ("cuda", "triton", "torch"))
    monkeypatch.setattr(backend, "available", lambda name: (name != "cuda", "not built"))
    assert backend.resolve("conv_bn_act", cuda) == "triton"  # the first available one


def test_info_says_what_runs_here(monkeypatch):
    """A backend that imports but has no device to run on is not reported as running here."""
    from fastres import info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    got = info.collect()["backends"]
    assert got["torch"]["available"] and got["torch"]["installed"]
    for name in ("triton", "cuda"):
        assert not got[name]["available"], name
        assert got[name]["why_not"], name
