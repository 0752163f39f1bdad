"""Test session setup.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on before
triton is first imported: TRITON_INTERPRET=1 is set here, at collection start, unless the caller
chose. Tests marked `gpu` are skipped, with the reason, when CUDA is not available.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a machine of 2 cores or fewer (CI), intra-op threads only fight each other and the tests'
# tiny tensors: one thread runs the suite several times faster.
if (os.cpu_count() or 1) <= 2:
    torch.set_num_threads(1)

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Allocations of kernel outputs come filled with NaN / 0xA5 within the test."""
    from fastres.kernels.alloc import poisoned

    with poisoned():
        yield


@pytest.fixture(autouse=True)
def _restore_backend():
    """Each test starts and ends on the backend the session started with."""
    import fastres.backend as b

    before = b._requested
    yield
    b._requested = before
    b._resolved.clear()
