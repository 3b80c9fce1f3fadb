"""The "triton" backend: Triton kernels from ``sparrow.kernels`` (the top-level kernels/ directory).

Triton needs a GPU, or ``TRITON_INTERPRET=1`` to run its kernels on the CPU (slowly: that mode is for tests).
Kernels register here as they land; an op this backend lacks falls back to the reference with a warning.
"""

from __future__ import annotations

import triton  # noqa: F401  (a missing Triton makes this backend unavailable, not an error)

import sparrow.kernels  # noqa: F401

import os


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, t) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{name}: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU), got {t.device}")
