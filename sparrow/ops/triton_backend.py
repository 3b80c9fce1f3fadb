"""The "triton" backend's norm and rotary kernels (kernels/rms_norm.py, kernels/rope.py) as torch.library
custom ops (so torch.compile treats each launch as one opaque node with a fake implementation) with autograd,
registered as this backend's kernels; its attention lives in :mod:`.triton_attention`. Eager calls skip the
dispatcher (:func:`.custom_ops.fast_path`); torch.compile sees the ops.

Triton needs a GPU, or ``TRITON_INTERPRET=1`` to run its kernels on the CPU (slowly: that mode is for tests).
A missing Triton makes the import fail, which the registry records as "backend unavailable", not an error.
An op this backend lacks falls back to the reference with a warning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparrow.kernels import rms_norm as _rms
from sparrow.kernels import rope as _rope

from .custom_ops import check_triton_device as check_device
from .custom_ops import fast_path
from .custom_ops import register_rope_autograd
from .custom_ops import unit_stride as _unit_stride
from .registry import register


def _check_last_dim_contiguous(name: str, t: Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the triton backend needs unit stride along the last dim, got strides {t.stride()}")


# ---------------------------------------------------------------------------------------------- rms_norm
def _rms_norm_fwd_impl(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, _, rstd = _rms.rms_norm_fwd(x, weight, eps)
    return y, rstd


_rms_norm_fwd = torch.library.custom_op("sparrow::triton_rms_norm_fwd", _rms_norm_fwd_impl, mutates_args=())


@_rms_norm_fwd.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32)


def _fused_add_rms_norm_fwd_impl(x: Tensor, residual: Tensor, weight: Tensor,
                                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, summed, rstd = _rms.rms_norm_fwd(x, weight, eps, residual)
    return y, summed, rstd


_fused_add_rms_norm_fwd = torch.library.custom_op("sparrow::triton_fused_add_rms_norm_fwd",
                                                  _fused_add_rms_norm_fwd_impl, mutates_args=())


@_fused_add_rms_norm_fwd.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32)


def _rms_norm_bwd_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_sum: Tensor | None
) -> tuple[Tensor, Tensor]:
    return _rms.rms_norm_bwd(grad_y, x, weight, rstd, grad_sum)


_rms_norm_bwd = torch.library.custom_op("sparrow::triton_rms_norm_bwd", _rms_norm_bwd_impl, mutates_args=())


@_rms_norm_bwd.register_fake
def _(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_sum: Tensor | None) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), torch.empty_like(weight)


_rms_norm_bwd_fast = fast_path(_rms_norm_bwd, _rms_norm_bwd_impl)


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad_y: Tensor, _grad_rstd: Tensor):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = _rms_norm_bwd_fast(_unit_stride(grad_y), x, weight, rstd, None)
    return grad_x, grad_w, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_rms_norm_fwd_fast = fast_path(_rms_norm_fwd, _rms_norm_fwd_impl, _rms_norm_setup, _rms_norm_backward)


def _fused_setup(ctx, inputs, output) -> None:
    _, _, weight, _ = inputs
    # Backward needs the sum, not x and residual: saving the output keeps one tensor instead of two.
    ctx.save_for_backward(output[1], weight, output[2])


def _fused_backward(ctx, grad_y: Tensor, grad_sum: Tensor, _grad_rstd: Tensor):
    summed, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = _rms_norm_bwd_fast(_unit_stride(grad_y), summed, weight, rstd, _unit_stride(grad_sum))
    # x and residual enter only through their sum: both get the same gradient.
    return grad_x, grad_x, grad_w, None


_fused_add_rms_norm_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)
_fused_add_rms_norm_fwd_fast = fast_path(_fused_add_rms_norm_fwd, _fused_add_rms_norm_fwd_impl, _fused_setup,
                                         _fused_backward)


def _check_rms_norm(x: Tensor, weight: Tensor, eps: float) -> None:
    check_device("x", x)
    if x.shape[-1] > _rms.MAX_HIDDEN:
        raise ValueError(f"x: hidden size {x.shape[-1]} exceeds the triton kernel's limit of {_rms.MAX_HIDDEN}")
    _check_last_dim_contiguous("weight", weight)


def _check_fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    _check_rms_norm(x, weight, eps)


def _rows(t: Tensor) -> Tensor:
    """(…, hidden) -> (rows, hidden) without a copy when the leading dims flatten to one row stride."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.shape[-1] <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    y, _ = _rms_norm_fwd_fast(_rows(x), weight, float(eps))
    return y.view(x.shape)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, summed, _ = _fused_add_rms_norm_fwd_fast(_rows(x), _rows(residual), weight, float(eps))
    return y.view(x.shape), summed.view(x.shape)


register("rms_norm", "triton", rms_norm, _check_rms_norm)
register("fused_add_rms_norm", "triton", fused_add_rms_norm, _check_fused_add_rms_norm)


# -------------------------------------------------------------------------------------------------- rope
def _rope_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    return _rope.rope(q, k, cos, sin, backward=backward)


_rope_op = torch.library.custom_op("sparrow::triton_rope", _rope_impl, mutates_args=())


@_rope_op.register_fake
def _(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


# The backward rotation takes the fast path too (the op itself while tracing).
_rope_setup, _rope_backward = register_rope_autograd("sparrow::triton_rope", fast_path(_rope_op, _rope_impl))
_rope_fast = fast_path(_rope_op, _rope_impl, _rope_setup, _rope_backward)


@torch.library.custom_op("sparrow::triton_rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    _rope.rope(q, k, cos, sin, q_out=q, k_out=k)


def _check_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_device(name, t)
    _check_last_dim_contiguous("q", q)
    _check_last_dim_contiguous("k", k)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos: the triton backend does not differentiate through cos/sin; detach them")


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rope_fast(q, k, cos, sin, False)


def apply_rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """In-place RoPE (returns q and k, rotated). Autograd cannot see through an in-place rotation of a tensor
    it needs for backward, so this is for tensors that do not require grad (inference, KV-cache fills)."""
    _check_rope(q, k, cos, sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("q: in-place RoPE is for tensors that do not require grad; use apply_rope")
    _rope_inplace_op(q, k, cos, sin)
    return q, k


register("apply_rope", "triton", apply_rope, _check_rope)
