"""What setup.py compiled into fastres._C, read from the built library with cuobjdump (no GPU needed):
SASS for every kernel file and the architectures listed, PTX of the newest plain architecture (so a
newer GPU JIT-loads the extension), and no --use_fast_math (IEEE divisions, denormals kept)."""
import glob
import os
import re
import shutil
import subprocess

import pytest

from fastres import _ext

BUILT, WHY = _ext.status()
pytestmark = pytest.mark.skipif(not BUILT, reason=f"fastres._C is not built: {WHY}")

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


def _cuobjdump():
    """cuobjdump from PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, or the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def dump():
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, triton's bin/)")
    so = _ext.module().__file__

    def run(*args):
        out = subprocess.run([exe, *args, so], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    return run


def test_sass_for_every_kernel_file_and_ptx_for_the_newest_arch(dump):
    elf = re.findall(r"(\w+)\.sm_(\d+a?)\.cubin", dump("--list-elf"))
    ptx = re.findall(r"(\w+)\.sm_(\d+a?)\.ptx", dump("--list-ptx"))
    sources = {os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(CSRC, "*.cu"))}
    assert {name for name, _ in elf} == sources, elf
    archs = {arch for _, arch in elf}
    for name in sources:
        assert {a for n, a in elf if n == name} == archs, f"{name}: SASS for {sorted(archs)} expected"
    plain = [a for a in archs if not a.endswith("a")]
    if plain:
        newest = max(plain, key=int)
        assert sorted(ptx) == sorted((name, newest) for name in sources), f"PTX for sm_{newest} only: {ptx}"


def test_built_without_fast_math(dump):
    """--use_fast_math turns every float division into div.approx and flushes denormals (.ftz)."""
    ptx = dump("-ptx")
    assert "div.rn.f32" in ptx  # the Welford 1/n and the merges
    assert re.search(r"\.ftz\b", ptx) is None, "denormals flushed: built with --use_fast_math?"
    assert re.search(r"div\.(approx|full)\.f32", ptx) is None, "approximate division"
