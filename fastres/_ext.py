"""Loading the CUDA C++ extension fastres._C (built from csrc/ by setup.py when nvcc is present).

Importing fastres._C registers the torch.library ops ``fastres::bn_*`` (CUDA implementations). It
imports on a machine without a GPU as long as torch is a CUDA build; it is simply absent when the
package was installed without nvcc (or with FASTRES_BUILD_CUDA=0).
"""
from __future__ import annotations

import functools
from typing import Tuple


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[object, str]:
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from fastres import _C  # type: ignore[attr-defined]
    except ImportError as e:
        msg = str(e)
        if "_C" in msg and ("No module named" in msg or "cannot import name" in msg):
            msg = ("fastres._C is not built (install with nvcc present, or FASTRES_BUILD_CUDA=1 to "
                   "make the build mandatory)")
        return None, msg
    except Exception as e:  # a built module that fails to load (ABI mismatch, missing libraries)
        return None, f"fastres._C failed to load: {type(e).__name__}: {e}"
    return _C, ""


def status() -> Tuple[bool, str]:
    """(built and loadable, reason when not)."""
    mod, why = _load()
    return mod is not None, why


def module():
    """The loaded fastres._C module; raises ImportError with the reason when it is unavailable."""
    mod, why = _load()
    if mod is None:
        raise ImportError(why)
    return mod
