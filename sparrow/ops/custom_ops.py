"""What the fast backends share when they wrap kernels as torch custom ops (``triton_*.py``, ``cuda_*.py``):
device and layout checks, the default softmax scale, and the autograd of a dense attention forward that
returns ``(out, lse)``. Written once here so the backends differ only in the kernels they call.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from .reference import default_scale  # noqa: F401  (one definition; the backends import it from here)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(name: str, t: Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{name}: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU), got {t.device}")


def unit_stride(t: Tensor | None) -> Tensor | None:
    """Incoming gradients can have any layout (expanded zeros, transposes); the kernels need unit stride."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def register_attention_autograd(fwd_op: str, bwd: Callable, prepare_grad: Callable[[Tensor], Tensor] = unit_stride) -> None:
    """Autograd for a dense attention op ``fwd_op(q, k, v, causal, scale) -> (out, lse)`` whose backward is
    ``bwd(grad_out, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``; ``prepare_grad`` puts the incoming
    gradient in a layout the backward kernel reads."""

    def setup(ctx, inputs, output) -> None:
        q, k, v, causal, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1])
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(prepare_grad(grad_out), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_autograd(fwd_op, backward, setup_context=setup)


def register_rope_autograd(rope_op: str, rope: Callable) -> None:
    """Autograd for a rotary op ``rope_op(q, k, cos, sin, backward) -> (q, k)``: the gradient of a rotation
    is the rotation by the negated angle, i.e. the same kernel with ``backward`` flipped."""

    def setup(ctx, inputs, output) -> None:
        _, _, cos, sin, backward = inputs
        ctx.save_for_backward(cos, sin)
        ctx.backward = backward

    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = rope(unit_stride(grad_q), unit_stride(grad_k), cos, sin, not ctx.backward)
        return grad_q, grad_k, None, None, None

    torch.library.register_autograd(rope_op, backward, setup_context=setup)
