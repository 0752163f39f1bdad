"""The tests' numerics: per-dtype tolerances and the house rule, in one place.

Every floating-point test compares a fused result against a float64 oracle (the same math run in
float64: fastres.ops.reference, or the torchvision / hand-written model after .double()) and against
PyTorch's own result in the same dtype as the fused one. The house rule:

    max|got - oracle|  <=  2 * max|ref - oracle|  +  ulps * eps(dtype) * max|oracle|

got: the fused result; ref: PyTorch's own same-dtype result on the same inputs; oracle: float64.
The first term says "no worse than about twice PyTorch's own rounding", the second lets through
results PyTorch happens to get (nearly) exactly, which a bare ratio would reject. The rule shows
something only where the comparison is well conditioned: PyTorch's own error must be small next to
the magnitude (BatchNorm over enough values per channel, small learning rates, first-step
gradients). Where PyTorch's fp32 result is itself several % off float64, any bound passes and
nothing is proven; where it is within rounding, the ratio of two rounding errors of one tensor is
stable (a max over many elements), and for a single scalar the ulps term must carry it.

    from numerics import assert_as_good, tol
    assert_as_good(fused_out, torch_out, oracle_out, name="output")   # dtype taken from torch_out
    torch.testing.assert_close(x, y, rtol=tol(x.dtype), atol=tol(x.dtype) * y.abs().max())

Without a same-dtype PyTorch result (a kernel with no PyTorch twin), use assert_near(got, oracle),
whose bound is tol(dtype) of the oracle's magnitude (the typical bounds below).
"""
from typing import Optional

import torch

# Typical bounds relative to the magnitude: what a correct fp32 / fp16 / bf16
# result of one fused op keeps from float64. float64 results are compared to a float64 oracle only
# where the order of summation differs: 1e-12 leaves room for reductions of ~1e6 terms.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}

# Default ulps of the house rule's floor: 8 fp32 ulps ~ 1e-6 of the magnitude.
ULPS = 8


def tol(dtype: torch.dtype) -> float:
    """The typical relative bound of one fused op's result in `dtype` (see TOL)."""
    try:
        return TOL[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for {dtype}; known: {', '.join(map(str, TOL))}") from None


def eps(dtype: torch.dtype) -> float:
    """One ulp at 1.0 in `dtype` (torch.finfo(dtype).eps)."""
    return torch.finfo(dtype).eps


def max_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |x - oracle| computed in float64; NaN or inf where x has one and the oracle does not."""
    if x.shape != oracle.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != oracle's {tuple(oracle.shape)}")
    if x.numel() == 0:
        return 0.0
    return (x.detach().double() - oracle.detach().double()).abs().max().item()


def magnitude(oracle: torch.Tensor) -> float:
    return oracle.detach().double().abs().max().item() if oracle.numel() else 0.0


def as_good_bound(ref: torch.Tensor, oracle: torch.Tensor, dtype: Optional[torch.dtype] = None,
                  ulps: float = ULPS) -> float:
    """The house rule's bound for a result in `dtype` (default ref's dtype): 2 x PyTorch's own error
    against the oracle, plus `ulps` ulps of the dtype times the oracle's largest magnitude."""
    dtype = dtype or ref.dtype
    return 2 * max_error(ref, oracle) + ulps * eps(dtype) * magnitude(oracle)


def assert_as_good(got: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, name: str = "",
                   ulps: float = ULPS, dtype: Optional[torch.dtype] = None) -> None:
    """The house rule: `got` (fused) is at most about twice as far from the float64 `oracle` as `ref`
    (PyTorch's own result in the same dtype, on the same inputs) is, plus `ulps` ulps of the dtype
    (default: ref's dtype) times max|oracle|. A NaN or inf in `got` that the oracle lacks fails."""
    err = max_error(got, oracle)
    base = max_error(ref, oracle)
    bound = as_good_bound(ref, oracle, dtype, ulps)
    assert err <= bound, (f"{name}: fused error {err:.3g} > bound {bound:.3g} (torch {dtype or ref.dtype} "
                          f"error {base:.3g}, oracle magnitude {magnitude(oracle):.3g})")


def assert_near(got: torch.Tensor, oracle: torch.Tensor, name: str = "", dtype: Optional[torch.dtype] = None,
                rel: Optional[float] = None) -> None:
    """For results without a PyTorch twin: max|got - oracle| <= tol(dtype) * max|oracle| (dtype: got's)."""
    rel = tol(dtype or got.dtype) if rel is None else rel
    err, bound = max_error(got, oracle), rel * magnitude(oracle)
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({rel:g} of {magnitude(oracle):.3g})"
