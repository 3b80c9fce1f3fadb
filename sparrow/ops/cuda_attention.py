"""The native flash-attention kernels (csrc/cuda/attention_fwd.cu, attention_bwd.cu) as the "cuda" backend of
``attention``: fake implementations and autograd for ``torch.ops.sparrow_C.attention_fwd/bwd``.

A ``sparrow._C`` built before these kernels existed lacks the ops; the backend then simply has no attention
kernel (explicit requests fall back to the reference with a warning, "auto" picks the next backend).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .custom_ops import below_autograd, default_scale, fast_path, register_attention_autograd
from .registry import register, set_auto_order

_DTYPES = (torch.bfloat16, torch.float16)
_HEAD_DIMS = (64, 128)


def _has_op(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow_C::{name}", "CUDA")
    except RuntimeError:  # the op is not defined at all in this build
        return False


if _has_op("attention_fwd") and _has_op("attention_bwd"):

    @torch.library.register_fake("sparrow_C::attention_fwd")
    def _attention_fwd_fake(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("sparrow_C::attention_bwd")
    def _attention_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _vector_friendly(t: Tensor) -> bool:
        # Alignment from the storage offset, not data_ptr(): fake tensors (torch.compile, opcheck) have no data
        # pointer, and PyTorch's allocators hand out storage at least 16-byte aligned.
        return (t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1])
                and t.storage_offset() * t.element_size() % 16 == 0)

    def _vectors(t: Tensor) -> Tensor:
        """The kernels move 16-byte vectors; a layout that does not allow them (odd strides, expanded or
        transposed gradients, or a contiguous view at an unaligned offset, which .contiguous() would return
        as is) is copied into fresh memory once."""
        return t if _vector_friendly(t) else t.clone(memory_format=torch.contiguous_format)

    _attention_autograd = register_attention_autograd("sparrow_C::attention_fwd", torch.ops.sparrow_C.attention_bwd,
                                                      prepare_grad=_vectors)
    _attention_fwd = fast_path(torch.ops.sparrow_C.attention_fwd, below_autograd(torch.ops.sparrow_C.attention_fwd),
                               *_attention_autograd)

    def _check_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.device.type != "cuda":
                raise ValueError(f"{name}: the cuda backend's attention has kernels for ['cuda'], got {t.device}")
            if t.dtype not in _DTYPES:
                raise ValueError(f"{name}: the cuda attention kernels take bfloat16 or float16, got {t.dtype}")
        if q.shape[-1] not in _HEAD_DIMS:
            raise ValueError(f"q: head_dim {q.shape[-1]} not supported by the cuda attention kernels {_HEAD_DIMS}")

    def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> Tensor:
        q, k, v = (_vectors(t) for t in (q, k, v))
        return _attention_fwd(q, k, v, bool(causal), default_scale(q, scale))[0]

    register("attention", "cuda", attention, _check_attention)

    # The native backward runs on CUDA cores (see attention_bwd.cu), far slower than the Triton one: until it
    # is a tensor-core kernel and measured, "auto" prefers Triton for attention.
    set_auto_order("attention", ("triton", "cuda", "reference"))
