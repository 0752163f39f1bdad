"""Loading fastres._cpu, the CPU helpers in C++ (csrc/cpu/, built by setup.py when a C++ compiler is
present; no CUDA needed). Today it holds one thing: the per-call proof of a frozen plan's guard
(fastres.models.plan_guard), which runs in Python when the extension is absent. ``cpu`` is the loaded
module or None; ``why`` says why it is None. FASTRES_NATIVE=0 in the environment leaves it unloaded
(the Python forms run), for a comparison or a suspected fault."""
from __future__ import annotations

import os

cpu = None
why = ""

if os.environ.get("FASTRES_NATIVE", "").strip() == "0":
    why = "FASTRES_NATIVE=0"
else:
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from fastres import _cpu as cpu  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as e:
        msg = str(e)
        missing = "_cpu" in msg and ("No module named" in msg or "cannot import name" in msg)
        why = ("fastres._cpu is not built (install with a C++ compiler present, or FASTRES_BUILD_CPU=1 to "
               "make the build mandatory)" if missing else f"fastres._cpu failed to load: {msg}")
    except Exception as e:   # a built module that fails to load (built against another torch)
        why = f"fastres._cpu failed to load: {type(e).__name__}: {e}"
