"""The "cuda" backend: native kernels from ``sparrow._C`` (registered in csrc/torch_bindings.cpp as
``torch.ops.sparrow_C.*``), given fake implementations and autograd here so that ``torch.compile`` and
``torch.library.opcheck`` work with them.

Some native ops also have CPU kernels; they let CI exercise the whole native path without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparrow import _C  # noqa: F401  (importing it registers torch.ops.sparrow_C)

from .custom_ops import below_autograd, fast_path, register_rope_autograd
from .registry import register

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native_devices(op_name: str) -> set[str]:
    """Device types with a kernel for ``sparrow_C::op_name`` in this build."""
    devices = set()
    for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow_C::{op_name}", key):
            devices.add(device)
    return devices


# ---------------------------------------------------------------------------------------------- rms_norm
@torch.library.register_fake("sparrow_C::rms_norm_fwd")
def _rms_norm_fwd_fake(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.register_fake("sparrow_C::rms_norm_bwd")
def _rms_norm_bwd_fake(
    grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_sum: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad_y: Tensor, _grad_rstd: Tensor):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.sparrow_C.rms_norm_bwd(grad_y.contiguous(), x, weight, rstd)
    return grad_x, grad_weight, None


torch.library.register_autograd("sparrow_C::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup_context)
# Eager calls skip the Python autograd kernel of the dispatcher (custom_ops.fast_path).
_rms_norm_fwd = fast_path(torch.ops.sparrow_C.rms_norm_fwd, below_autograd(torch.ops.sparrow_C.rms_norm_fwd),
                          _rms_norm_setup_context, _rms_norm_backward)

_RMS_NORM_DEVICES = _native_devices("rms_norm_fwd")


def _check_rms_norm(x: Tensor, weight: Tensor, eps: float) -> None:
    if x.device.type not in _RMS_NORM_DEVICES:
        raise ValueError(f"x: the cuda backend's rms_norm has kernels for {sorted(_RMS_NORM_DEVICES)}, got {x.device}")
    if x.dtype not in _NATIVE_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported by the cuda backend")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} must match x dtype {x.dtype} for the cuda backend")
    if not weight.is_contiguous():
        raise ValueError("weight: the cuda backend needs a contiguous weight")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    y, _ = _rms_norm_fwd(x.reshape(-1, x.shape[-1]).contiguous(), weight, float(eps))
    return y.view(x.shape)


register("rms_norm", "cuda", rms_norm, _check_rms_norm)


# ------------------------------------------------------------------------------------ fused_add_rms_norm
@torch.library.register_fake("sparrow_C::fused_add_rms_norm_fwd")
def _fused_add_rms_norm_fwd_fake(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


def _fused_setup_context(ctx, inputs, output) -> None:
    _, _, weight, _ = inputs
    # The backward needs only the sum: saving the output keeps one activation instead of x and residual.
    ctx.save_for_backward(output[1], weight, output[2])


def _fused_backward(ctx, grad_y: Tensor, grad_sum: Tensor, _grad_rstd: Tensor):
    summed, weight, rstd = ctx.saved_tensors
    grad_sum = grad_sum.contiguous() if grad_sum is not None else None
    grad_x, grad_weight = torch.ops.sparrow_C.rms_norm_bwd(grad_y.contiguous(), summed, weight, rstd, grad_sum)
    # x and residual enter only through their sum.
    return grad_x, grad_x, grad_weight, None


torch.library.register_autograd(
    "sparrow_C::fused_add_rms_norm_fwd", _fused_backward, setup_context=_fused_setup_context
)
_fused_add_rms_norm_fwd = fast_path(torch.ops.sparrow_C.fused_add_rms_norm_fwd,
                                    below_autograd(torch.ops.sparrow_C.fused_add_rms_norm_fwd),
                                    _fused_setup_context, _fused_backward)

_FUSED_DEVICES = _native_devices("fused_add_rms_norm_fwd")


def _check_fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    if x.device.type not in _FUSED_DEVICES:
        raise ValueError(f"x: the cuda backend's fused_add_rms_norm has kernels for {sorted(_FUSED_DEVICES)}, got {x.device}")
    _check_rms_norm(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    flat = (-1, x.shape[-1])
    y, summed, _ = _fused_add_rms_norm_fwd(
        x.reshape(flat).contiguous(), residual.reshape(flat).contiguous(), weight, float(eps)
    )
    return y.view(x.shape), summed.view(x.shape)


register("fused_add_rms_norm", "cuda", fused_add_rms_norm, _check_fused_add_rms_norm)


# -------------------------------------------------------------------------------------------------- rope
@torch.library.register_fake("sparrow_C::rope")
def _rope_fake(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool = False) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.register_fake("sparrow_C::rope_")
def _rope_inplace_fake(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool = False) -> None:
    return None


_rope = fast_path(torch.ops.sparrow_C.rope, below_autograd(torch.ops.sparrow_C.rope),
                  *register_rope_autograd("sparrow_C::rope", torch.ops.sparrow_C.rope))

_ROPE_DEVICES = _native_devices("rope")


def _check_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.device.type not in _ROPE_DEVICES:
        raise ValueError(f"q: the cuda backend's apply_rope has kernels for {sorted(_ROPE_DEVICES)}, got {q.device}")
    for name, t in (("q", q), ("k", k)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: the cuda backend needs unit stride along head_dim, got strides {t.stride()}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos: the cuda backend does not differentiate through cos/sin; detach them")


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rope(q, k, cos, sin, False)


def apply_rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """In-place RoPE (returns q and k, rotated), for tensors that do not require grad: autograd would need the
    unrotated values that this overwrites."""
    _check_rope(q, k, cos, sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("q: in-place RoPE is for tensors that do not require grad; use apply_rope")
    torch.ops.sparrow_C.rope_(q, k, cos, sin, False)
    return q, k


register("apply_rope", "cuda", apply_rope, _check_rope)
