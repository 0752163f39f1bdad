"""Every registered backend module keeps the contract of fastres.backends.contract.Backend: the same
declarations, and for every op the same function names with the same parameter names in the same order
(the custom ops and the autograd Functions call them positionally); the oracle keeps it too."""
import inspect

import pytest

from fastres import backend
from fastres.backends.contract import Backend
from fastres.ops import reference

FUNCTIONS = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]


def _params(fn, drop_self=False):
    names = list(inspect.signature(fn).parameters)
    return names[1:] if drop_self else names


@pytest.mark.parametrize("name", list(backend.REGISTRY))
def test_backend_module_follows_the_contract(name):
    ok, why = backend.available(name)
    if not ok:
        pytest.skip(f"{name} is not available here: {why}")
    mod = backend.module(name)
    for attr in ("NAME", "DEVICES", "DTYPES", "OPS"):
        assert hasattr(mod, attr), f"{name} does not declare {attr}"
    assert mod.NAME == name
    for fn in FUNCTIONS:
        op = fn.rsplit("_", 1)[0]
        if op in ("available", "device") or op in mod.OPS:
            assert hasattr(mod, fn), f"backend {name} lacks {fn}"
            assert _params(getattr(mod, fn)) == _params(getattr(Backend, fn), drop_self=True), f"{name}.{fn}"
    assert set(mod.OPS) == {"conv_bn_act", "bn_act"}


def test_oracle_follows_the_contract():
    for fn in FUNCTIONS:
        if fn.endswith(("_forward", "_backward")):
            assert _params(getattr(reference, fn)) == _params(getattr(Backend, fn), drop_self=True), fn


def test_registry_table_lists_every_backend():
    rows = {r["name"]: r for r in backend.table()}
    assert set(rows) == set(backend.REGISTRY)
    assert rows["torch"]["available"] and rows["torch"]["runs_here"]
    assert backend.BACKENDS == ("auto",) + tuple(backend.REGISTRY)
