"""Loading fastres's C++ extensions (:func:`load_extension`; fastres._cpu's loader is fastres/_native.py),
and the CUDA one, fastres._C, built from csrc/ by setup.py when nvcc is present.

Importing fastres._C registers the torch.library ops ``fastres::bn_*`` (CUDA implementations). It
imports on a machine without a GPU as long as torch is a CUDA build; it is simply absent when the
package was installed without nvcc (or with FASTRES_BUILD_CUDA=0).
"""
from __future__ import annotations

import functools
import importlib
from typing import Tuple


def load_extension(name: str, how: str) -> Tuple[object, str]:
    """(the built extension fastres.<name>, "") or (None, why not); `how`: how to have it built (said
    when it is not)."""
    try:
        import torch  # noqa: F401  (the extensions link against torch's libraries)

        mod = importlib.import_module(f"fastres.{name}")
    except ImportError as e:
        msg = str(e)
        if name in msg and ("No module named" in msg or "cannot import name" in msg):
            msg = f"fastres.{name} is not built ({how})"
        return None, msg
    except Exception as e:  # a built module that fails to load (ABI mismatch, missing libraries)
        return None, f"fastres.{name} failed to load: {type(e).__name__}: {e}"
    return mod, ""


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[object, str]:
    return load_extension("_C", "install with nvcc present, or FASTRES_BUILD_CUDA=1 to make the build mandatory")


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
