"""Install: a regular (non-editable) install carries fastres.kernels; setup.py's environment switches
are validated with messages that say what was expected."""
import glob
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(env_extra, *args):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_wheel_without_cuda_carries_the_triton_kernels_and_imports(tmp_path):
    env = dict(os.environ, FASTRES_BUILD_CUDA="0", FASTRES_BUILD_CPU="0")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                        ROOT, "-w", str(tmp_path / "wheel")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = glob.glob(str(tmp_path / "wheel" / "fastres-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    for mod in ("conv", "batchnorm", "alloc"):
        assert f"fastres/kernels/{mod}.py" in names
    for mod in ("torch", "triton", "cuda", "common"):
        assert f"fastres/backends/{mod}.py" in names
    assert not any(n.endswith(".so") for n in names)  # FASTRES_BUILD_CUDA=0, FASTRES_BUILD_CPU=0: none
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        whl], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # -S: no site hooks, so the editable install of this checkout (a path hook) cannot answer for
    # fastres; torch and friends come from site-packages, fastres only from the wheel.
    code = (f"import sys; sys.path[:0] = [{str(target)!r}, {sysconfig.get_paths()['purelib']!r}]; "
            "import fastres, fastres.kernels.conv as c; print(c.__file__); "
            "print(fastres.backend.available('cuda')); import fastres._native as n; print(n.cpu, n.why)")
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith(str(target))
    assert "fastres._C is not built" in r.stdout
    assert "None fastres._cpu is not built" in r.stdout   # (the Python forms of its checks run)


def test_bad_build_switches_are_named():
    r = _setup({"FASTRES_BUILD_CUDA": "yes"}, "--version")
    assert r.returncode != 0 and "FASTRES_BUILD_CUDA must be 0, 1 or unset, got 'yes'" in r.stderr
    r = _setup({"FASTRES_BUILD_CPU": "on"}, "--version")
    assert r.returncode != 0 and "FASTRES_BUILD_CPU must be 0, 1 or unset, got 'on'" in r.stderr


def test_bad_arch_list_is_named():
    r = _setup({"FASTRES_BUILD_CUDA": "1", "FASTRES_CUDA_ARCHS": "hopper"}, "--version")
    assert r.returncode != 0
    assert ("FASTRES_CUDA_ARCHS must look like '80;90', got 'hopper'" in r.stderr
            or "cannot be built" in r.stderr)  # (no toolkit here: that is said first)


def test_old_setuptools_without_wheel_is_named_before_anything_compiles():
    # setuptools < 70.1 takes bdist_wheel from `wheel`: pip's metadata step (dist_info) needs it
    code = ("import sys, setuptools; setuptools.__version__ = '68.1.2'; sys.modules['wheel'] = None; "
            "sys.argv = ['setup.py', 'dist_info']; import runpy; runpy.run_path('setup.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, FASTRES_BUILD_CUDA="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "setuptools 68.1.2 has no bdist_wheel" in r.stderr and "scripts/build_inplace.py" in r.stderr
    assert "CUDA" not in r.stderr  # said before the extension is even looked at


def test_build_inplace_dry_run_imports_this_checkout():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_inplace.py"), "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"kernels from {ROOT}/kernels/conv.py" in r.stdout
    assert r.stdout.splitlines()[-1] == f"python: {sys.executable}"
