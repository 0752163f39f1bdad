"""Loading fastres._cpu, the CPU helpers in C++ (csrc/cpu/, built by setup.py when a C++ compiler is
present; no CUDA needed). Today it holds one thing: the per-call proof of a frozen plan's guard
(fastres.models.plan_guard), which runs in Python when the extension is absent. ``cpu`` is the loaded
module or None; ``why`` says why it is None. FASTRES_NATIVE=0 in the environment leaves it unloaded
(the Python forms run), for a comparison or a suspected fault."""
from __future__ import annotations

import os

from fastres._ext import load_extension

cpu = None
why = ""

if os.environ.get("FASTRES_NATIVE", "").strip() == "0":
    why = "FASTRES_NATIVE=0"
else:
    cpu, why = load_extension("_cpu", "install with a C++ compiler present, or FASTRES_BUILD_CPU=1 to make "
                                      "the build mandatory")
