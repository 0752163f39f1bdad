"""Build fastres._C and fastres._cpu in this checkout and make the checkout importable, without pip,
`wheel`, a new setuptools or the network: the GPU machines' own Python (old setuptools, no `wheel`, PEP 668).

    python scripts/build_inplace.py [--venv DIR] [--dry-run]

1. Says what it found: Python, setuptools, `wheel`, torch (and its CUDA), nvcc, whether the Python is
   externally managed (PEP 668), and what it will do.
2. Runs `python setup.py build_ext --inplace` once (fastres/_C*.so and _cpu*.so beside the sources), with
   the environment as given: FASTRES_BUILD_CUDA=1 (FASTRES_BUILD_CPU=1) makes a compile error of that
   extension fail this script, at once.
   setuptools has run build_ext by itself, with no wheel involved, in every version.
3. Makes `import fastres` find this checkout: a .pth file adds the checkout to sys.path, and a small
   finder maps fastres.kernels to kernels/ (setup.py's package_dir; a plain path entry cannot). They go
   into the site-packages of the running venv; outside a venv into a venv made at DIR (default
   build/venv) with --system-site-packages --without-pip, so the system's torch, triton and pytest are
   seen and nothing is written where the system's packages live. The last line printed is
   `python: PATH`, the interpreter to use afterwards.

--dry-run: step 2 replaced by `setup.py --version` (setup.py's checks run, nothing compiles) and the
import files written into a temporary folder that the check loads with site.addsitedir: what CI runs,
so that the GPU run's build stage has been executed before a GPU is spent on it.
Exit status: 0 done; 1 the build failed; 2 bad arguments or no place to put the .pth.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = "fastres-checkout.pth"
FINDER = "_fastres_checkout_finder"

FINDER_SOURCE = '''"""Written by scripts/build_inplace.py: fastres.kernels comes from {kernels!r}."""
import importlib.util
import os
import sys

KERNELS = {kernels!r}


class FastresKernelsFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "fastres.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(KERNELS, "__init__.py"), submodule_search_locations=[KERNELS])


def install():
    if not any(f is FastresKernelsFinder for f in sys.meta_path):
        sys.meta_path.append(FastresKernelsFinder)
'''


def say(msg):
    print(f"build_inplace: {msg}", flush=True)


def version_of(module):
    if importlib.util.find_spec(module) is None:
        return None
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception as e:  # a broken install is worth naming, not a crash
        return f"broken ({type(e).__name__}: {e})"


def externally_managed():
    """PEP 668: the marker file beside the standard library, and not inside a venv."""
    return not in_venv() and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))


def in_venv():
    return sys.prefix != getattr(sys, "base_prefix", sys.prefix)


def preflight():
    torch_v = version_of("torch")
    cuda = None
    if torch_v and not torch_v.startswith("broken"):
        import torch

        cuda = torch.version.cuda
    facts = {
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "setuptools": version_of("setuptools") or "MISSING (setup.py needs it)",
        "wheel": version_of("wheel") or "not installed (not needed here)",
        "torch": f"{torch_v} (CUDA {cuda})" if torch_v else "MISSING",
        "nvcc": shutil.which("nvcc") or "not on PATH",
        "PEP 668": "externally managed" if externally_managed() else ("a venv" if in_venv() else "not marked"),
    }
    for k, v in facts.items():
        say(f"{k:10s} {v}")
    missing = [k for k in ("setuptools", "torch") if facts[k].startswith("MISSING")]
    return missing


def site_dir_of(python):
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def make_venv(venv):
    py = venv_python(venv)
    if os.path.exists(py):
        say(f"reusing the venv {venv}")
        return py
    say(f"making a venv at {venv} (--system-site-packages --without-pip: the system's packages stay visible)")
    r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    if r.returncode != 0 or not os.path.exists(py):
        return None
    return py


def write_import_files(site):
    os.makedirs(site, exist_ok=True)
    kernels = os.path.join(ROOT, "kernels")
    with open(os.path.join(site, FINDER + ".py"), "w") as f:
        f.write(FINDER_SOURCE.format(kernels=kernels))
    with open(os.path.join(site, PTH), "w") as f:
        f.write(f"{ROOT}\nimport {FINDER}; {FINDER}.install()\n")
    say(f"wrote {PTH} and {FINDER}.py into {site}")


def build(dry_run):
    cmd = [sys.executable, "setup.py", "--version"] if dry_run else [sys.executable, "setup.py", "build_ext",
                                                                       "--inplace"]
    mode = os.environ.get("FASTRES_BUILD_CUDA", "")
    say(("dry run: " if dry_run else "") + " ".join(cmd) + f"  (FASTRES_BUILD_CUDA={mode!r})")
    return subprocess.run(cmd, cwd=ROOT).returncode


def check_import(python, site=None):
    """Import fastres from outside the checkout and check it is this checkout's. With site (dry run):
    python -S, the interpreter's site-packages on sys.path without their .pth files (an editable
    install there must not answer for fastres), then site.addsitedir(site) reads ours."""
    flags, code = [], ""
    if site:
        flags = ["-S"]
        purelib = site_dir_of(python)  # asked before -S: without site, a venv's python forgets the venv
        code = f"import sys, site; sys.path.append({purelib!r}); site.addsitedir({site!r}); "
    code += (f"import fastres, fastres.kernels.conv as c, fastres._ext as e; root = {ROOT!r}; "
             "print('fastres from', fastres.__file__); print('kernels from', c.__file__); "
             "assert fastres.__file__.startswith(root) and c.__file__.startswith(root + '/kernels/'); "
             "ok, why = e.status(); print('fastres._C', 'loads' if ok else why); "
             "import fastres._native as n; print('fastres._cpu', 'loads' if n.cpu else n.why)")
    return subprocess.run([python, *flags, "-c", code], cwd=os.path.expanduser("~") or "/").returncode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", default=os.path.join(ROOT, "build", "venv"),
                    help="where to make a venv when not running in one (default build/venv)")
    ap.add_argument("--dry-run", action="store_true", help="check everything, compile nothing")
    args = ap.parse_args(argv)
    missing = preflight()
    if missing:
        say(f"cannot build: {', '.join(missing)} missing from this Python")
        return 1
    where = ("a temporary folder (dry run)" if args.dry_run else
             "this venv" if in_venv() else f"a venv at {args.venv}")
    say(f"plan: setup.py build_ext --inplace, then the import files into {where}")
    rc = build(args.dry_run)
    if rc != 0:
        say(f"the build failed (exit {rc}); the first error above is the one to read. Not retrying.")
        return 1
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            write_import_files(tmp)
            rc = check_import(sys.executable, tmp)
        python = sys.executable
    else:
        python = sys.executable if in_venv() else make_venv(args.venv)
        if python is None:
            say(f"could not make a venv at {args.venv} (is Python's venv module there?)")
            return 2
        write_import_files(site_dir_of(python))
        rc = check_import(python)
    if rc != 0:
        say("import check failed")
        return 1
    print(f"python: {python}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
