"""Numerical tolerances and comparison helpers shared by the tests and the benchmarks' correctness checks.

One table, per dtype: a fast kernel's output (and each gradient) must match the reference within these.
They reflect float32 accumulation inside the kernels; the inputs and outputs are rounded to the dtype.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

# Gradients pass through a reduction over rows or the sequence (dW, dK, dV); allow for their longer sums.
GRAD_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype: torch.dtype, *, grad: bool = False) -> dict[str, float]:
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, grad: bool = False, name: str = "") -> None:
    """``torch.testing.assert_close`` with the tolerance of ``expected``'s dtype."""
    torch.testing.assert_close(actual, expected, **tolerance(expected.dtype, grad=grad), msg=lambda m: f"{name}: {m}")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()
