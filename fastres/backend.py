"""fastres.backend: the public name of fastres.backends (set_backend, calls, AUTO_PREFERENCE, ...).

Kept so that code written against ``fastres.backend`` keeps working: it is the very same module
object as fastres.backends, so setting or reading anything through either name is one state.
"""
import sys

from fastres import backends as _backends

sys.modules[__name__] = _backends
