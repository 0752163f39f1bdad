"""fastres._C's kernels under compute-sanitizer (memcheck, racecheck, synccheck) on a GPU: every op,
dtype, vector and scalar path, aligned and misaligned data. Skipped, with the reason, where the tool
is not installed."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from fastres import _ext

BUILT, WHY = _ext.status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not BUILT, reason=f"fastres._C is not built: {WHY}")]

SANITIZER_SCRIPT = r"""
import torch
from fastres.backends import cuda as ci
torch.manual_seed(0)
CL = torch.channels_last
def z_of(shape, dtype, misalign=False):
    n, c, h, w = shape
    base = torch.randn(n * h * w * c + misalign, device="cuda").to(dtype)
    return base[int(misalign):].view(n, h, w, c).permute(0, 3, 1, 2)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape in [(2, 64, 5, 5), (3, 12, 3, 5), (2, 5, 3, 3), (1, 8, 1, 1), (3, 40, 7, 1), (2, 2056, 2, 2)]:
        for misalign in (False, True):
            c = shape[1]
            z = z_of(shape, dtype, misalign)
            g = z_of(shape, dtype, misalign)
            rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            w, b = torch.rand(c, device="cuda"), torch.randn(c, device="cuda")
            mean, invstd = ci.bn_stats(z, rm, rv, 0.1, 1e-5)
            for relu, res in ((True, z_of(shape, dtype, misalign)), (False, None)):
                y, mask = ci.bn_apply(z, mean, invstd, w, b, res, relu, True)
                for training in (True, False):
                    ci.bn_backward(g, z, mask, mean, invstd, w, training, relu, True)
                    ci.bn_backward(g, z, mask, mean, invstd, None, training, relu, False)
torch.cuda.synchronize()
print("sanitizer script done")
"""


def _sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    homes += sorted((os.path.join("/usr/local", d) for d in os.listdir("/usr/local") if d.startswith("cuda-")),
                    reverse=True)
    for home in homes:
        path = os.path.join(home, "bin", "compute-sanitizer")
        if home and os.path.isfile(path):
            return path
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool, tmp_path):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)")
    script = tmp_path / "sanitize_bn.py"
    script.write_text(SANITIZER_SCRIPT)
    # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    # Only fastres's kernels (namespace fastres, in both mangled and demangled names) are checked.
    cmd = [exe, "--tool", tool, "--error-exitcode", "1", "--kernel-name", "kns=fastres", sys.executable,
           str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    text = out.stdout + out.stderr
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0 and "sanitizer script done" in out.stdout, log
    assert re.search(r"ERROR SUMMARY: [1-9]|\(([1-9]\d*) errors", text) is None, log
