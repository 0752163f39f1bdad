"""fastres.kernels: the Triton kernels of fastres and their host launchers (installed from kernels/).

This package stands alone: it imports nothing of fastres outside fastres.kernels, so the kernels can
be read, compiled and tested on their own. Importing the package itself does not import triton;
its modules do.

* conv.py               - host side of the implicit-GEMM conv2d over NHWC (statistics / folded-BN epilogues)
* conv_kernel.py        - its @triton.jit kernel, autotune configs and pruning model
* conv_s2d.py           - the 3-channel stem as a space-to-depth conv
* batchnorm.py          - host side of BatchNorm finalize, apply (+ residual, ReLU, bit mask), backward
* batchnorm_kernels.py  - their @triton.jit kernels
* warmup.py             - tune every autotune key before CUDA-graph capture
* report.py             - compiled-kernel report (python -m fastres.kernels.report): PTX, registers, spills
* report_variants.py    - the launches conv.py and batchnorm.py make, described for report.py to compile
* alloc.py              - output allocation with the poison switch tests use
* shapes.py             - the convolution's output size (triton-free; also fastres.layout's)
* cli.py                - the one-line-error argument parser of every fastres command line
"""
import os

__all__ = ["interpreter_active"]


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
