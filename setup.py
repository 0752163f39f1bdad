"""fastres install. The CUDA C++ extension fastres._C is built from csrc/ when nvcc and a CUDA build of
torch are present; the CPU one, fastres._cpu, from csrc/cpu/ when a C++ compiler is (any torch build;
without it the same checks run in Python: fastres/_native.py). Environment:
  FASTRES_BUILD_CUDA  unset: build when possible, otherwise install without it (and say why);
                      1: build or fail; 0: skip.
  FASTRES_BUILD_CPU   the same for fastres._cpu.
  FASTRES_CUDA_ARCHS  compute capabilities to compile SASS for, default "80;90" ("90a" for sm_90a);
                      PTX is added for the newest plain one, so newer GPUs JIT-load the extension.
  MAX_JOBS            parallel compile jobs (torch's ninja build honours it).
  CUDA_HOME           the CUDA toolkit; when unset, found from nvcc (following a wrapper script).
Install with --no-build-isolation so the build sees the installed torch. A Python whose setuptools
cannot build a wheel (older than 70.1 without the `wheel` package, as a system Python may be) is told so
before anything compiles; `python scripts/build_inplace.py` builds and imports this checkout there
without pip or `wheel`.
"""
import glob
import importlib.util
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("FASTRES_BUILD_CUDA", "").strip()
if MODE not in ("", "0", "1"):
    sys.exit(f"FASTRES_BUILD_CUDA must be 0, 1 or unset, got {MODE!r}")
CPU_MODE = os.environ.get("FASTRES_BUILD_CPU", "").strip()
if CPU_MODE not in ("", "0", "1"):
    sys.exit(f"FASTRES_BUILD_CPU must be 0, 1 or unset, got {CPU_MODE!r}")


def say(msg):
    print(f"fastres setup: {msg}", file=sys.stderr)


def check_build_tools():
    """Stop before compiling when this setuptools cannot finish the command pip asked for: a wheel or an
    editable install needs bdist_wheel (in setuptools itself from 70.1, before that in `wheel`), and the
    legacy `develop` of setuptools < 80 cannot map fastres.kernels to kernels/."""
    import setuptools

    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    commands = set(sys.argv[1:])
    wheel_missing = version < (70, 1) and importlib.util.find_spec("wheel") is None
    if commands & {"bdist_wheel", "editable_wheel", "dist_info"} and wheel_missing:
        sys.exit(f"fastres setup: setuptools {setuptools.__version__} has no bdist_wheel (setuptools has it "
                 "from 70.1; older ones take it from the `wheel` package, which is not installed), so pip "
                 "cannot build or install fastres with this Python. Install `wheel` or setuptools>=70.1, or "
                 "build in place without either: python scripts/build_inplace.py")
    if "develop" in commands and version < (80,):
        sys.exit(f"fastres setup: `setup.py develop` of setuptools {setuptools.__version__} cannot map "
                 "fastres.kernels to kernels/; use pip install --no-build-isolation -e . (setuptools>=64 "
                 "with `wheel`, or >=70.1) or python scripts/build_inplace.py")


def is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "crt", "host_defines.h"))


def find_cuda_home():
    """The CUDA toolkit folder: CUDA_HOME, else the one nvcc belongs to (a wrapper script on PATH is
    followed to the nvcc it runs), else /usr/local/cuda or the newest /usr/local/cuda-*."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            candidates += [m.group(1) for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc\b", head)]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if is_toolkit(c)), None)


def skipped(variable, mode, what, why, after=""):
    """([], {}) for an extension that cannot be built (`why`), said; an exit when `variable` is 1."""
    if mode == "1":
        sys.exit(f"fastres setup: {variable}=1 but {what} cannot be built: {why}")
    say(f"not building {what}: {why}{after}")
    return [], {}


def build_ext_command(build_extension):
    return {"build_ext": build_extension.with_options(use_ninja=shutil.which("ninja") is not None)}


def cuda_extension():
    """([CUDAExtension], {"build_ext": BuildExtension}) or ([], {}) when the extension is skipped."""
    if MODE == "0":
        say("FASTRES_BUILD_CUDA=0: not building the CUDA extension")
        return [], {}
    why = None
    cuda_home = find_cuda_home()
    try:
        import torch
    except ImportError:
        torch, why = None, "torch is not installed in the build environment (use --no-build-isolation)"
    if why is None and cuda_home is None:
        why = "no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset)"
    if why is None and torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    if why is not None:
        return skipped("FASTRES_BUILD_CUDA", MODE, "the CUDA extension", why)
    os.environ["CUDA_HOME"] = cuda_home
    say(f"building fastres._C with the CUDA toolkit in {cuda_home}")
    archs = os.environ.get("FASTRES_CUDA_ARCHS", "80;90")
    arch_list = [a.strip() for a in re.split(r"[;, ]+", archs) if a.strip()]
    parts = [re.fullmatch(r"(\d+)(\d)(a?)", a) for a in arch_list]
    if not parts or not all(parts):
        sys.exit(f"fastres setup: FASTRES_CUDA_ARCHS must look like '80;90', got {archs!r}")
    # SASS for every listed architecture, and PTX for the newest plain (not "a") one, which the driver
    # JIT-compiles on GPUs newer than any listed. Given -gencode flags, torch adds none of its own.
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch_list]
    ptx = max((a for a in arch_list if not a.endswith("a")), key=int, default=None)
    gencode += [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"] if ptx else []
    say(f"compute capabilities {', '.join(arch_list)} (SASS), PTX for {ptx or 'none'}")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    # ATen's CUDA headers include CUDA library headers that pip's nvidia packages ship.
    for site in sys.path:
        inc = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            include_dirs.append(inc)
            break
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        sys.exit("fastres setup: csrc/ has no sources")
    ext = CUDAExtension(
        "fastres._C", sources, include_dirs=include_dirs,
        # C++20 for the host code: torch's headers (2.14) need it. The .cu files include no torch
        # header, so they stay on nvcc's C++17. No --use_fast_math: it makes the Welford divisions
        # approximate and flushes denormals; the kernels use fmaf and rsqrtf where they want them.
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo", *gencode]})
    return [ext], build_ext_command(BuildExtension)


def cpu_extension():
    """([CppExtension fastres._cpu], {"build_ext": BuildExtension}) or ([], {}) when it is skipped."""
    if CPU_MODE == "0":
        say("FASTRES_BUILD_CPU=0: not building the CPU extension")
        return [], {}
    why = None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        why = "torch is not installed in the build environment (use --no-build-isolation)"
    if why is None:
        import sysconfig

        cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        if shutil.which(cxx.split()[0]) is None:
            why = f"no C++ compiler ({cxx.split()[0]} not on PATH)"
    if why is not None:
        return skipped("FASTRES_BUILD_CPU", CPU_MODE, "the CPU extension", why, " (its checks run in Python)")
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # (-fopenmp on Linux with an OpenMP torch: at::parallel_for's OpenMP pragma is compiled here, and
    # libgomp.so.1 resolves at load time to the one torch has loaded, so the extension's threads are torch's
    # intra-op pool; elsewhere at::parallel_for runs on the caller's thread)
    omp = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
    ext = CppExtension("fastres._cpu", sources, extra_compile_args=["-O3", "-std=c++20", *omp], extra_link_args=omp)
    return [ext], build_ext_command(BuildExtension)


class _Optional:
    """Wraps build_ext so that a failed compile of an extension whose FASTRES_BUILD_* is not 1 leaves the
    install without it (and says so loudly) instead of failing it."""

    MANDATORY = {"fastres._C": MODE == "1", "fastres._cpu": CPU_MODE == "1"}
    VARIABLE = {"fastres._C": "FASTRES_BUILD_CUDA", "fastres._cpu": "FASTRES_BUILD_CPU"}

    @classmethod
    def wrap(cls, cmdclass):
        if "build_ext" not in cmdclass:
            return cmdclass
        base = cmdclass["build_ext"]

        class build_ext(base):
            failed = ()

            def build_extension(self, ext):
                if cls.MANDATORY.get(ext.name, False):
                    return super().build_extension(ext)
                try:
                    return super().build_extension(ext)
                except Exception as e:  # compile errors surface as various distutils errors
                    say(f"WARNING: building {ext.name} failed ({e}); fastres installs without it. Set "
                        f"{cls.VARIABLE.get(ext.name)}=1 to make this an error.")
                    self.failed += (ext.name,)

            def build_extensions(self):
                super().build_extensions()
                # (what was not built is not copied into the source tree or listed among the outputs)
                self.extensions = [e for e in self.extensions if e.name not in self.failed]

        return {"build_ext": build_ext}


check_build_tools()
ext_modules, cmdclass = cuda_extension()
cpu_modules, cpu_cmdclass = cpu_extension()
ext_modules += cpu_modules
cmdclass = cmdclass or cpu_cmdclass

setup(
    name="fastres",
    version="0.1.0",
    description="ResNet for PyTorch with fused conv + BatchNorm (+ add) (+ ReLU) kernels in Triton and CUDA C++",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastres", "fastres.ops", "fastres.models", "fastres.backends", "fastres.convert", "fastres.train",
              "fastres.bench", "fastres.kernels"],
    package_dir={"fastres.kernels": "kernels"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "train": ["tqdm", "matplotlib", "scikit-learn", "pillow"],
        # the drop-in tests run fastres under the tools users bring: timm, ONNX (+ onnxruntime), Lightning
        "test": ["pytest", "pytest-benchmark", "torchvision", "scikit-learn", "tqdm", "matplotlib", "pillow",
                 "ruff", "timm", "onnx", "onnxscript", "onnxruntime", "lightning", "torchinfo"],
        # the benchmark suite's onnxruntime baseline (its rows are skipped without these: fastres/bench/baselines.py)
        "bench": ["pytest", "pytest-benchmark", "torchvision", "tqdm", "onnx", "onnxscript", "onnxruntime"],
    },
    ext_modules=ext_modules,
    cmdclass=_Optional.wrap(cmdclass),
    zip_safe=False,
)
