"""Backend registry and dispatch for the ops layer.

A backend is a set of kernels, one per op it implements, each with a ``check`` that raises ``ValueError``
(naming the argument) for inputs the kernel cannot take. Each backend lives in its own module, imported once
when ``sparrow.ops`` is (``load_backends``); one that fails to import (no Triton, no compiled extension) is
recorded as unavailable with the reason, so ``import sparrow`` never needs either. Loading up front keeps
dispatch free of imports, which ``torch.compile(fullgraph=True)`` could not trace.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("reference", "triton", "cuda")
_CHOICES = (*BACKENDS, "auto")

# Modules whose import registers a backend's kernels, imported in order (attention after the module that
# loads the backend's extension).
_BACKEND_MODULES = {
    "reference": ("sparrow.ops.reference_backend",),
    "triton": ("sparrow.ops.triton_backend", "sparrow.ops.triton_attention", "sparrow.ops.triton_moe"),
    "cuda": ("sparrow.ops.cuda_backend", "sparrow.ops.cuda_attention"),
}

# "auto" on a CUDA tensor tries these in order; an op may override its order once its kernels are measured.
_AUTO_ORDER_CUDA = ("cuda", "triton", "reference")
_auto_order_overrides: dict[str, tuple[str, ...]] = {}


def _no_check(*args, **kwargs) -> None:
    return None


@dataclass(frozen=True)
class Kernel:
    fn: Callable
    check: Callable[..., None] = _no_check


_kernels: dict[str, dict[str, Kernel]] = {}
_load_errors: dict[str, str] = {}
_loaded: set[str] = set()
_warned: set[tuple[str, str]] = set()
# A plain list rather than thread-local state: torch.compile traces through reads of it.
_backend_stack: list[str] = [os.environ.get("SPARROW_BACKEND", "auto")]


def register(op: str, backend: str, fn: Callable, check: Callable[..., None] | None = None) -> None:
    """Register ``fn`` as ``backend``'s kernel for ``op``; ``check(*args)`` raises ValueError on bad input."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    _kernels.setdefault(op, {})[backend] = Kernel(fn, check or _no_check)


def set_auto_order(op: str, order: tuple[str, ...]) -> None:
    """Set which backends "auto" tries, fastest first, for ``op`` on CUDA tensors."""
    unknown = [b for b in order if b not in BACKENDS]
    if unknown:
        raise ValueError(f"order: unknown backends {unknown}")
    _auto_order_overrides[op] = tuple(order)


def _load(backend: str) -> bool:
    """Import the backend's module once; remember why it failed so the fallback message can say."""
    if backend in _loaded:
        return True
    if backend in _load_errors:
        return False
    try:
        for module in _BACKEND_MODULES[backend]:
            importlib.import_module(module)
    except Exception as exc:  # ImportError, or triton failing to find a driver: both mean "not here"
        _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        return False
    _loaded.add(backend)
    return True


def load_backends() -> None:
    for backend in BACKENDS:
        _load(backend)


def backend_error(backend: str) -> str | None:
    """Why ``backend`` could not be loaded, or None if it loads."""
    return None if _load(backend) else _load_errors[backend]


def available_backends() -> list[str]:
    """Backends whose kernels load on this machine (the reference always does)."""
    return [b for b in BACKENDS if _load(b)]


def get_backend() -> str:
    """The backend used when an op is called with ``backend=None``: set by :func:`use_backend`, else
    ``$SPARROW_BACKEND`` (read at import), else "auto"."""
    return _backend_stack[-1]


def _validate_name(backend: str) -> str:
    if backend not in _CHOICES:
        raise ValueError(f"backend: must be one of {_CHOICES}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the enclosed ops (those called with ``backend=None``) on ``backend``."""
    _backend_stack.append(_validate_name(backend))
    try:
        yield
    finally:
        _backend_stack.pop()


def _warn_once(op: str, backend: str, reason: str) -> None:
    if (op, backend) in _warned:
        return
    _warned.add((op, backend))
    warnings.warn(f"sparrow.ops.{op}: backend {backend!r} {reason}; falling back to the reference", stacklevel=4)


def _check_passes(kernel: Kernel, args: tuple) -> bool:
    try:
        kernel.check(*args)
    except ValueError:
        return False
    return True


def resolve(op: str, backend: str | None, device: torch.device, args: tuple) -> Callable:
    """Pick the kernel for ``op``.

    * An explicit backend that is missing (not built, no Triton), or that lacks ``op``, falls back to the
      reference with a warning, once. One that is present but cannot take these inputs raises its
      ``ValueError``: asking for a kernel and silently getting another would hide the problem.
    * "auto" tries, fastest first, the backends that suit the device and takes the first whose check passes.
    """
    name = _validate_name(backend if backend is not None else get_backend())
    kernels = _kernels[op]
    if name == "auto":
        order = _auto_order_overrides.get(op, _AUTO_ORDER_CUDA) if device.type == "cuda" else ("reference",)
        for candidate in order:
            if _load(candidate) and candidate in kernels and _check_passes(kernels[candidate], args):
                return kernels[candidate].fn
        return kernels["reference"].fn
    if not _load(name):
        _warn_once(op, name, f"is unavailable ({_load_errors[name]})")
        return kernels["reference"].fn
    kernel = kernels.get(name)
    if kernel is None:
        _warn_once(op, name, "has no kernel for this op")
        return kernels["reference"].fn
    kernel.check(*args)
    return kernel.fn
